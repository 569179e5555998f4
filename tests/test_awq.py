"""AWQ search: it beats RTN where activations have outliers, folding is exact, the cheap (Gram) losses
equal the direct ones, search files round-trip bit for bit, and calibration text is read deterministically.

Also home of the tiny-model builders that test_quantize_cli.py and test_evaluate.py import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.loader import load_model
from tinychat.models import hf_shapes
from tinychat.models.llama import LlamaForCausalLM
from tinychat.quant import awq
from tinychat.quant.awq import SearchSettings, block_parts, family_for
from tinychat.quant.calib import calibration_blocks, load_calibration, read_documents
from tinychat.quant.blocks import block_runner
from tinychat.quant.fake_quant import apply_search, awq_search, fake_quantize_model
from tinychat.quant.rtn import fake_quantize
from tinychat.quant.search_io import SearchResult, load_search, model_signature, save_search

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------------
# Tiny models and tokenizers (imported by the other quantizer test files)


def tiny_config(**overrides) -> dict:
    cfg = {"model_type": "llama", "vocab_size": 260, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
           "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float16"}
    cfg.update(overrides)
    return cfg


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json (one token per byte, ids 0..255) plus bos/eos specials 256/257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_tiny_model(path: Path, seed: int = 0, dtype=torch.float16, outliers: bool = True,
                     tamper=None, **overrides) -> Path:
    """An HF-format LLaMA directory with random weights; norms get a few large channels (the activation
    outliers AWQ exists for). `tamper(tensors)` may corrupt tensors before saving."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**overrides)
    config = ModelConfig.from_dict(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
            if outliers:
                t[torch.randperm(shape[0], generator=gen)[:3]] *= 12
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        tensors[name] = t.to(dtype)
    if tamper:
        tamper(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))
    write_byte_tokenizer(path)
    return path


def calib_text(n_docs: int = 40, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    words = ["the", "model", "weights", "quantize", "activation", "scale", "group", "token", "lobster",
             "river", "of", "and", "a", "in", "to", "is", "with", "blue", "seven", "apple"]
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(20, 60, (1,), generator=gen))
        docs.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=gen)) + ".")
    return "\n".join(docs) + "\n"


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "tiny")


def fp32_model(path: Path):
    return load_model(path, dtype="fp32")


class ByteTok:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------------
# A synthetic block with outlier input channels


def _block_setup(seed=0, n_kv=4):
    config = ModelConfig.from_dict(tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                               num_key_value_heads=n_kv, num_hidden_layers=1))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    block = model.model.layers[0]
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.1 * torch.randn_like(p))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight[torch.randperm(128)[:4]] *= 15
    hidden = torch.randn(8, 32, 128)
    return model, block, hidden, block_runner(model.rotary, 32, torch.device("cpu"))


def _fake_quant_block(block, bits, g):
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        lin = block.get_submodule(name)
        lin.weight.data = fake_quantize(lin.weight.data, bits, g)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("scaling", ["plain", "duo", "best"])
def test_awq_block_error_below_rtn(bits, scaling):
    import copy

    model, block, hidden, run = _block_setup()
    settings = SearchSettings(w_bit=bits, group_size=32, scaling=scaling, sample_tokens=128, gram_tokens=0)
    with torch.no_grad():
        ref = run(block, hidden)
        rtn = copy.deepcopy(block)
        _fake_quant_block(rtn, bits, 32)
        err_rtn = (run(rtn, hidden) - ref).pow(2).mean()
        searched = copy.deepcopy(block)
        result, out = awq.search_block(searched, awq.Activations(hidden), run, family_for(model.config),
                                       block_parts(model.config), settings)
        # sequential (the default): the next block's inputs are this block's outputs as quantized, and
        # the full-precision outputs are carried beside them
        with awq.quantized_block(copy.deepcopy(searched), block_parts(model.config), result.codes,
                                 settings) as quantized:
            assert torch.equal(out.x, awq.forward_chunks(quantized, hidden, run, settings))
        assert torch.equal(out.fp, awq.forward_chunks(block, hidden, run, settings))
        assert set(result.scales) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                      "mlp.up_proj"}
        assert all(best <= first for first, best in result.losses.values())
        _fake_quant_block(searched, bits, 32)
        err_awq = (run(searched, hidden) - ref).pow(2).mean()
    assert err_awq < 0.8 * err_rtn, (float(err_awq), float(err_rtn))


def test_sequential_search_carries_both_models_and_replays_bit_for_bit(tmp_path):
    """Two blocks in a row: the second is searched on the first's quantized outputs with the full-precision
    ones beside them, and replay_block (a resumed run, from the saved codes) gives the same bits."""
    import copy

    from tinychat.quant.search_io import read_codes, write_codes

    model, block, hidden, run = _block_setup(n_kv=2)
    parts, family = block_parts(model.config), family_for(model.config)
    # The Gram sample: 3 whole sequences of the 8 (the full-precision path runs on those only)
    settings = SearchSettings(w_bit=4, group_size=32, sample_tokens=128, gram_tokens=70).resolved(hidden.device)
    picked = awq.gram_seqs(8, 32, settings)
    assert picked.tolist() == [0, 4, 7]
    with torch.no_grad():
        first, acts = awq.search_block(copy.deepcopy(block), awq.Activations(hidden), run, family, parts, settings)
        second, after = awq.search_block(copy.deepcopy(block), acts, run, family, parts, settings)
        assert acts.fp.shape == (3, 32, 128)
        assert torch.equal(acts.fp, awq.forward_chunks(block, hidden, run, settings)[picked])
        # the quantized model has drifted from the full-precision one
        assert not torch.equal(acts.x[picked], acts.fp)
        assert torch.equal(after.fp, awq.forward_chunks(block, acts.fp, run, settings))
        for i, result in enumerate((first, second)):
            write_codes(tmp_path / f"{i}.safetensors", result.codes)
            codes = read_codes(tmp_path / f"{i}.safetensors")
            assert codes.keys() == result.codes.keys()
            assert all(torch.equal(a, b) for name in codes for a, b in zip(codes[name], result.codes[name]))
        replayed = awq.Activations(hidden)
        for result in (first, second):
            replayed = awq.replay_block(copy.deepcopy(block), replayed, run, family, parts, result,
                                        result.codes, settings)
    assert torch.equal(replayed.x, after.x) and torch.equal(replayed.fp, after.fp)


def test_cross_gram_pairs_the_same_tokens_of_both_models():
    """X_fp^T X over the Gram sample pairs each token of the full-precision path with the same token of the
    quantized path, whatever the forward chunks (3 sequences a chunk here, the sample 3 of 8 sequences)."""
    model, block, hidden, run = _block_setup(n_kv=2)
    parts, family = block_parts(model.config), family_for(model.config)
    settings = SearchSettings(w_bit=4, group_size=32, gram_tokens=70, chunk_seqs=3, forward_dtype="fp32")
    picked = awq.gram_seqs(8, 32, settings)
    fp_hidden = hidden[picked] + 0.1 * torch.randn(3, 32, 128)
    with torch.no_grad():
        fp_inputs, _ = awq.fp_gram_inputs(block, fp_hidden, run, parts, settings)
        stats, _, _ = awq.collect_stats(block, hidden, run, family, parts, settings, fp_inputs)
        q_inputs, _ = awq.fp_gram_inputs(block, hidden[picked], run, parts, settings)
    for site, st in stats.items():
        assert st.gram_n == 3 * 32
        assert torch.allclose(st.gram, q_inputs[site].t() @ q_inputs[site], rtol=1e-4, atol=1e-3), site
        assert torch.allclose(st.cross, fp_inputs[site].t() @ q_inputs[site], rtol=1e-4, atol=1e-3), site


def test_forward_dtype_auto_follows_the_instruction_set(monkeypatch):
    from tinychat import devices

    cpu = torch.device("cpu")
    for flags, want in (({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), ({"avx2", "avx512f"}, "fp32")):
        monkeypatch.setattr(devices, "_FLAGS", flags)
        assert SearchSettings().resolved(cpu).forward_dtype == want
        assert SearchSettings(forward_dtype="fp32").resolved(cpu).forward_dtype == "fp32"
    with pytest.raises(ValueError, match="forward_dtype"):
        SearchSettings(forward_dtype="fp16")
    # bf16 forward passes stay close to fp32 ones (fp32 accumulation; the statistics stay fp32)
    model, block, hidden, run = _block_setup()
    ref = awq.forward_chunks(block, hidden, run, SearchSettings(forward_dtype="fp32"))
    low = awq.forward_chunks(block, hidden, run, SearchSettings(forward_dtype="bf16"))
    assert low.dtype == torch.float32
    assert float((low - ref).norm() / (ref - hidden).norm()) < 2e-2


def test_gqa_skips_v_to_o():
    model, block, _, _ = _block_setup(n_kv=2)
    parts = block_parts(model.config)
    applies = {g.prev: awq.group_applies(g, parts, block) for g in family_for(model.config).groups}
    assert applies == {"input_layernorm": True, "self_attn.v_proj": False, "post_attention_layernorm": True,
                       "mlp.up_proj": True}


def test_folding_scales_keeps_full_precision_output():
    # In float64 so that only a wrong fold (not fp32 rounding of outputs ~10) could move the output.
    model, block, hidden, run = _block_setup(n_kv=4)
    block.double()
    hidden = hidden.double()
    parts = block_parts(model.config)
    with torch.no_grad():
        ref = run(block, hidden)
        for group in family_for(model.config).groups:
            assert awq.group_applies(group, parts, block)
            width = parts[group.linears[0]].in_features
            awq.apply_scale(block, parts, group, torch.rand(width) * 4 + 0.25)
        out = run(block, hidden)
    assert (out - ref).abs().max() < 1e-5


def test_gram_loss_equals_direct_mse():
    torch.manual_seed(1)
    x = torch.randn(300, 64) * torch.rand(64) * 3
    w = torch.randn(48, 64) * 0.1
    wq = fake_quantize(w, 4, 32)
    st = awq.InputStats(torch.zeros(64, dtype=torch.float64), torch.zeros(2, 32, 32), n=300,
                        gram=x.t() @ x, gram_n=300)
    direct = (x @ w.t() - x @ wq.t()).pow(2).mean()
    assert awq._gram_loss(w, st, bf16=False)(wq) == pytest.approx(float(direct), rel=1e-4)
    assert awq._gram_loss(w, st, bf16=True)(wq) == pytest.approx(float(direct), rel=2e-2)  # bf16 products


def test_clip_search_equals_direct_per_group_error():
    """The block-diagonal Gram gives the same choice as AutoAWQ's per-group output error on tokens."""
    torch.manual_seed(2)
    g, rows = 16, 24
    x = torch.randn(200, 64) * (1 + 5 * (torch.rand(64) > 0.9))
    w = torch.randn(rows, 64) * 0.05
    w[0, 3] = 1.0  # an outlier weight: clipping pays off in its group
    settings = SearchSettings(w_bit=3, group_size=g)
    xg = x.view(200, -1, g).transpose(0, 1)
    grams = xg.transpose(1, 2) @ xg
    got = awq.search_clip(w, grams, settings)
    errs = []
    for ratio in settings.clip_ratios():
        amax = w.view(rows, -1, g).abs().amax(-1)
        wq = fake_quantize(w, 3, g, clip_max=amax * ratio)
        # AutoAWQ: out[o, t, j] = sum over the group's inputs; error averaged over tokens.
        d = (w - wq).view(rows, 1, -1, g) * x.view(1, 200, -1, g)
        errs.append(d.sum(-1).pow(2).mean(1))
    want = torch.stack(errs).argmin(0)
    assert torch.equal(got.long(), want)
    assert got.max() > 0  # some group did clip


# ------------------------------------------------------------------------------------------------------
# Whole-model search, save and load


def _search(model, settings, n=4, seqlen=32):
    ids = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return awq_search(model, ids, settings, progress=False)


def _linear_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "layers" in k}


def test_save_load_search_reproduces_weights(tiny_dir, tmp_path):
    settings = SearchSettings(w_bit=4, group_size=32)
    model = fp32_model(tiny_dir)
    blocks = _search(model, settings)
    result = SearchResult(settings, blocks, {"source": "random"}, model_signature(model.config))
    file = save_search(tmp_path / "s.safetensors", result)
    searched = _linear_weights(model)

    fresh = fp32_model(tiny_dir)
    loaded = load_search(file, fresh.config)
    assert loaded.settings == settings and loaded.calibration == {"source": "random"}
    apply_search(fresh, loaded)
    reloaded = _linear_weights(fresh)
    assert searched.keys() == reloaded.keys()
    for k in searched:
        assert torch.equal(searched[k], reloaded[k]), k
    fake_quantize_model(model, 4, 32)
    fake_quantize_model(fresh, 4, 32)
    for k, v in _linear_weights(model).items():
        assert torch.equal(v, _linear_weights(fresh)[k]), k


def test_load_search_rejects_other_model(tiny_dir, tmp_path):
    settings = SearchSettings(w_bit=4, group_size=32)
    model = fp32_model(tiny_dir)
    result = SearchResult(settings, _search(model, settings), {}, model_signature(model.config))
    file = save_search(tmp_path / "s.safetensors", result)
    other = ModelConfig.from_dict(tiny_config(num_hidden_layers=3))
    with pytest.raises(TinychatError, match="different model"):
        load_search(file, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TinychatError, match="not a safetensors"):
        load_search(tmp_path / "junk.safetensors", model.config)


def test_search_rejects_nan_weights(tiny_dir):
    model = fp32_model(tiny_dir)
    model.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(TinychatError, match="NaN"):
        _search(model, SearchSettings(w_bit=4, group_size=32))


# ------------------------------------------------------------------------------------------------------
# Calibration text


def test_calibration_plain_text_and_jsonl_agree(tmp_path):
    text = calib_text()
    plain = tmp_path / "c.txt"
    plain.write_text(text)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line, "meta": 1}) + "\n" for line in text.splitlines()))
    a = load_calibration(plain, ByteTok(), n_samples=6, seqlen=64, seed=3)
    b = load_calibration(jsonl, ByteTok(), n_samples=6, seqlen=64, seed=3)
    assert a.shape == (6, 64) and a.dtype == torch.int64
    assert torch.equal(a, b)


def test_calibration_deterministic_per_seed(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text(calib_text())
    a = load_calibration(plain, ByteTok(), n_samples=4, seqlen=64, seed=1)
    assert torch.equal(a, load_calibration(plain, ByteTok(), n_samples=4, seqlen=64, seed=1))
    assert not torch.equal(a, load_calibration(plain, ByteTok(), n_samples=4, seqlen=64, seed=2))


def test_calibration_short_text_and_errors(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij\nklmnopqrst\n")  # 20 tokens
    got = load_calibration(short, ByteTok(), n_samples=8, seqlen=8)
    assert got.shape == (2, 8)
    assert "using 2 blocks" in capsys.readouterr().err
    with pytest.raises(TinychatError, match="fewer than one block"):
        load_calibration(short, ByteTok(), n_samples=8, seqlen=64)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TinychatError, match="no text"):
        read_documents(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(TinychatError, match="line 2"):
        read_documents(bad)
    with pytest.raises(TinychatError, match="no such file"):
        read_documents(tmp_path / "missing.txt")


def test_calibration_keeps_long_documents():
    docs = ["x" * 1000, "y" * 10]
    got = calibration_blocks(docs, ByteTok(), n_samples=2, seqlen=500, seed=0)
    assert got.shape == (2, 500)


@pytest.mark.skipif(not (SHARED / "calib" / "c4-sample.txt").is_file(), reason="../shared/data is absent")
def test_c4_sample_gives_full_budget():
    docs = read_documents(SHARED / "calib" / "c4-sample.txt")
    assert len(docs) == 118
    got = calibration_blocks(docs, ByteTok(), n_samples=128, seqlen=512)
    assert got.shape == (128, 512)
