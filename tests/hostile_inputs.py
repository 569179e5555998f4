"""Builders for the hostile-input tests (test_bad_inputs.py, test_fuzz.py): tiny valid model directories,
AWQ checkpoints and GGUF files that each test then breaks in one way, and the CLI-result checks.

Everything here is small (a 1-layer, 64-wide LLaMA) so a test can load it through the real CLI in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinychat.config import ModelConfig
from tinychat.models import hf_shapes

TINY = {"model_type": "llama", "vocab_size": 260, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float16"}

# Words an actionable message uses to say what to do next.
ACTION_WORDS = ("use ", "give", "re-download", "redownload", "pass ", "set ", "convert", "choose", "free ",
                "remove", "install", "drop ", "check", "fix ", "restore", "copy", "re-export", "re-run",
                "shorten", "raise ", "pick", "reinstall", "delete", "must be", "expected", "lower", "make ",
                "only ", "supported", "must ", "needs ")


def tiny_tensors(config: dict | None = None, seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    cfg = ModelConfig.from_dict(config or TINY)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1 + 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        tensors[name] = t.to(dtype)
    return tensors


def write_byte_tokenizer(path: Path, extra_tokens: int = 0) -> None:
    """tokenizer.json with one token per byte (ids 0..255), <s>=256, </s>=257, then `extra_tokens` more."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"] + [f"<extra_{i}>" for i in range(extra_tokens)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_model(path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A full-precision HF directory: config.json, model.safetensors, tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TINY if config is None else config)
    save_file(tiny_tensors(config) if tensors is None else tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(path)
    return path


def edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def edit_tensors(path: Path, fn) -> Path:
    """Rewrite model.safetensors with fn(tensors) applied (fn edits the dict in place)."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))
    return path


DELETE = object()


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: the 'untouched' check compares two snapshots."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(err: str, *needles: str, hint: bool = True) -> str:
    """The 'tinychat: error: ...' line that ends stderr (progress lines such as "loading ..." may come
    before it); it must be the only error line, name each needle and say what to do."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("tinychat: error: "), f"no error line at the end of:\n{err}"
    assert sum(line.startswith("tinychat: error") for line in lines) == 1, f"expected one error line:\n{err}"
    assert "Traceback" not in err
    line = lines[-1]
    for needle in needles:
        assert str(needle) in line, f"{needle!r} not in {line!r}"
    assert not hint or any(word in line for word in ACTION_WORDS), f"no hint of what to do in {line!r}"
    return line


# ----------------------------------------------------------------------------------------------------------
# GGUF


GGUF_SHAPE = {"hidden": 16, "ffn": 32, "heads": 2, "kv_heads": 1, "layers": 1}
GGUF_SPECIALS = ["<unk>", "<s>", "</s>"]


def gguf_vocab() -> list[str]:
    from tokenizers import pre_tokenizers

    return GGUF_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he"]


def gguf_metadata() -> dict[str, tuple]:
    """The tiny GGUF's key/values: key -> (value, GGUFValueType[, array item type])."""
    from gguf import GGUFValueType as T

    s, vocab = GGUF_SHAPE, gguf_vocab()
    return {
        "llama.block_count": (s["layers"], T.UINT32),
        "llama.context_length": (64, T.UINT32),
        "llama.embedding_length": (s["hidden"], T.UINT32),
        "llama.feed_forward_length": (s["ffn"], T.UINT32),
        "llama.attention.head_count": (s["heads"], T.UINT32),
        "llama.attention.head_count_kv": (s["kv_heads"], T.UINT32),
        "llama.rope.freq_base": (10000.0, T.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.tokens": (vocab, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": ([3] * len(GGUF_SPECIALS) + [1] * (len(vocab) - len(GGUF_SPECIALS)),
                                      T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (["Ġ t", "h e"], T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.chat_template": ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}", T.STRING),
    }


def gguf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    s = GGUF_SHAPE
    h, hd, n_vocab = s["hidden"], s["hidden"] // s["heads"], len(gguf_vocab())
    shapes = {"token_embd.weight": (n_vocab, h), "output_norm.weight": (h,)}
    for i in range(s["layers"]):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
            f"blk.{i}.attn_q.weight": (s["heads"] * hd, h), f"blk.{i}.attn_k.weight": (s["kv_heads"] * hd, h),
            f"blk.{i}.attn_v.weight": (s["kv_heads"] * hd, h), f"blk.{i}.attn_output.weight": (h, h),
            f"blk.{i}.ffn_gate.weight": (s["ffn"], h), f"blk.{i}.ffn_up.weight": (s["ffn"], h),
            f"blk.{i}.ffn_down.weight": (h, s["ffn"]),
        })
    rng = np.random.default_rng(seed)
    return {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_gguf(path: Path, metadata: dict | None = None, tensors: dict | None = None,
                    arch: str = "llama") -> Path:
    """A tiny llama GGUF (f32 tensors, byte-level BPE tokenizer, chat template) that import_gguf accepts;
    `metadata` and `tensors` replace the defaults (gguf_metadata(), gguf_tensors()) when given."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, spec in (gguf_metadata() if metadata is None else metadata).items():
        w.add_key_value(key, *spec)
    for name, value in (gguf_tensors() if tensors is None else tensors).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
