"""ModelConfig: the model's shape, built from an HF config.json (unknown keys are ignored)."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TinychatError

# The architecture registry: config.json's model_type -> the module of tinychat/models that runs it (SmolLM,
# Mistral, Qwen2 and Qwen3 are LLaMA-shaped; Gemma 3's differences are real enough for a module of its own).
MODEL_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma3"}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")
MAX_LAYERS, MAX_DIM = 4096, 1 << 24

# The JSON type each known field must have: config.json comes from strangers, and a wrong type must be a
# one-line error here rather than a TypeError deep in the model.
_INT, _NUMBER, _BOOL, _STR, _DICT, _IDS, _LIST = "an integer", "a number", "true or false", "a string", \
    "an object", "a token id or a list of token ids", "a list"
_FIELD_TYPES = {
    "model_type": _STR, "hidden_act": _STR, "hidden_activation": _STR,
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "num_attention_heads": _INT, "num_key_value_heads": _INT, "head_dim": _INT, "max_position_embeddings": _INT,
    "sliding_window": _INT, "bos_token_id": _INT, "eos_token_id": _IDS,
    "rms_norm_eps": _NUMBER, "rope_theta": _NUMBER, "rope_local_base_freq": _NUMBER,
    "query_pre_attn_scalar": _NUMBER, "layer_types": _LIST,
    "tie_word_embeddings": _BOOL, "attention_bias": _BOOL, "mlp_bias": _BOOL,
    "rope_scaling": _DICT, "rope_parameters": _DICT, "quantization_config": _DICT,
}


_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _has_type(value, kind: str) -> bool:
    if kind == _INT:
        return _is_int(value)
    if kind == _NUMBER:
        return _is_int(value) or isinstance(value, float)
    if kind == _IDS:
        return _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    return isinstance(value, {_BOOL: bool, _STR: str, _DICT: dict, _LIST: list}[kind])


def _short(value) -> str:
    return reprlib.repr(value)


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 spelling of rope_theta + rope_scaling
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Per layer "full_attention" or "sliding_attention" (Gemma 3, Qwen); None: every layer alike, windowed
    # when sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    # Gemma 3: local (sliding) layers' rope base, the attention's 1/sqrt scale, the GELU-tanh activation.
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    hidden_activation: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        per_type = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        if isinstance(per_type.get("full_attention"), dict):  # transformers >= 5 Gemma 3: one set per layer type
            local = per_type.get("sliding_attention") or {}
            self.rope_parameters = per_type["full_attention"]
            self.rope_local_base_freq = local.get("rope_theta", self.rope_local_base_freq)
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default")) != "default":
                self.rope_scaling = self.rope_parameters
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.model_type == "mistral" and self.extra.get("use_sliding_window") is False:
            self.sliding_window = None
        if self.model_type in ("qwen2", "qwen3"):
            self._qwen_windows()
        if self.model_type == "gemma3_text":
            self._gemma3_defaults()
        self.validate()

    def _qwen_windows(self) -> None:
        """HF's Qwen2/Qwen3 rule: a window only with use_sliding_window, on the layers from max_window_layers on."""
        if self.extra.get("use_sliding_window") is not True:
            self.sliding_window = None
        elif self.layer_types is None and _is_int(self.num_hidden_layers) and 0 < self.num_hidden_layers <= MAX_LAYERS:
            first = self.extra.get("max_window_layers", 28)
            first = first if _is_int(first) else 28
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= first
                                else "full_attention" for i in range(self.num_hidden_layers)]

    def _gemma3_defaults(self) -> None:
        """HF's Gemma3TextConfig defaults for what a config.json may leave out."""
        if self.layer_types is None and _is_int(self.num_hidden_layers) and 0 < self.num_hidden_layers <= MAX_LAYERS:
            pattern = self.extra.get("sliding_window_pattern", 6)
            pattern = pattern if _is_int(pattern) and pattern > 0 else 6
            self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.sliding_window = self.sliding_window or 4096
        self.rope_local_base_freq = self.rope_local_base_freq or 10000.0
        self.query_pre_attn_scalar = self.query_pre_attn_scalar or 256
        self.hidden_activation = self.hidden_activation or "gelu_pytorch_tanh"

    def layer_window(self, i: int) -> int | None:
        """Layer i's attention window (keys within the last `window` positions), None for full attention."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def validate(self) -> None:
        if self.model_type not in MODEL_FAMILIES:
            hint = "; for Gemma 3 give the text model (model_type gemma3_text)" if self.model_type == "gemma3" else ""
            raise TinychatError(
                f"config.json: model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(MODEL_FAMILIES)}){hint}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TinychatError(f"config.json: {name} must be a positive integer, got {value!r}")
            # Far beyond any real model; a hostile value would otherwise make the loader loop or allocate
            # for hours before the weights could disagree with it.
            limit = MAX_LAYERS if name == "num_hidden_layers" else MAX_DIM
            if value > limit:
                raise TinychatError(f"config.json: {name} {value} is implausibly large (at most {limit}); "
                                    "the file is corrupt, re-download it")
        if self.num_attention_heads % self.num_key_value_heads:
            raise TinychatError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if "head_dim" not in self.extra and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise TinychatError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
            )
        if self.head_dim % 2:
            raise TinychatError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):  # rope_theta may come from rope_parameters
            value = getattr(self, name)
            if not (_has_type(value, _NUMBER) and 0 < value < math.inf):
                raise TinychatError(f"config.json: {name} must be a positive finite number, got {_short(value)}")
        if self.mlp_bias:
            raise TinychatError("config.json: mlp_bias=true is not supported")
        if self.family == "gemma3":
            self._validate_gemma3()
        elif self.hidden_act not in ("silu", "swish"):
            raise TinychatError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or any(t not in LAYER_TYPES for t in self.layer_types)):
            raise TinychatError(f"config.json: layer_types must list one of {', '.join(LAYER_TYPES)} for each of "
                                f"the {self.num_hidden_layers} layers, got {_short(self.layer_types)}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise TinychatError(f"config.json: sliding_window must be a positive integer, got {self.sliding_window!r}")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            raise TinychatError("config.json: max_position_embeddings must be a positive integer, "
                                f"got {_short(self.max_position_embeddings)}")
        self._validate_rope_scaling()

    def _validate_gemma3(self) -> None:
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise TinychatError(f"config.json: hidden_activation {self.hidden_activation!r} is not supported "
                                "for Gemma 3 (only gelu_pytorch_tanh)")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if self.extra.get(name) is not None:
                raise TinychatError(f"config.json: {name} is not supported (Gemma 3 does not use it; "
                                    "this looks like a Gemma 2 config)")
        if self.extra.get("use_bidirectional_attention"):
            raise TinychatError("config.json: use_bidirectional_attention (embedding models) is not supported")
        for name in ("rope_local_base_freq", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if not (_has_type(value, _NUMBER) and 0 < value < math.inf):
                raise TinychatError(f"config.json: {name} must be a positive finite number, got {_short(value)}")

    @property
    def family(self) -> str:
        """The tinychat/models module that runs this model_type."""
        return MODEL_FAMILIES[self.model_type]

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise TinychatError(f"config.json: rope_scaling must be an object or null, got {_short(scaling)}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise TinychatError(f"config.json: rope_scaling type {_short(kind)} is not supported "
                                f"(only {', '.join(ROPE_TYPES)})")
        needed = {"linear": ("factor",),
                  "llama3": ("factor", "original_max_position_embeddings")}.get(kind, ())
        for key in needed + ("low_freq_factor", "high_freq_factor"):
            value = scaling.get(key)
            # factor < 1 is what transformers warns about too; a tiny one overflows the frequencies to inf.
            low = 1 if key == "factor" else 0
            if (key in needed or value is not None) and not (
                    _has_type(value, _NUMBER) and low <= value < math.inf and value > 0):
                what = "a finite number >= 1" if key == "factor" else "a positive finite number"
                raise TinychatError(f"config.json: rope_scaling {key} must be {what} for {kind!r} scaling, "
                                    f"got {_short(value)}")
        if kind == "llama3" and not scaling.get("high_freq_factor", 4.0) > scaling.get("low_freq_factor", 1.0):
            raise TinychatError("config.json: rope_scaling high_freq_factor must be greater than low_freq_factor")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TinychatError(f"config.json: expected a JSON object, got {type(d).__name__}; "
                                "re-download the model's config.json")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # A null for a field with a default means the default (HF writes e.g. "sliding_window": null).
        known = {k: v for k, v in d.items() if k in names and not (v is None and k not in _REQUIRED)}
        for k, v in known.items():
            if k in _FIELD_TYPES and not _has_type(v, _FIELD_TYPES[k]):
                raise TinychatError(f"config.json: {k} must be {_FIELD_TYPES[k]}, got {_short(v)}")
        # `extra` keeps the raw dict so fields can tell "absent" from "default" (head_dim, use_sliding_window).
        extra = {k: v for k, v in d.items() if k not in names}
        if "head_dim" in d and d["head_dim"] is not None:
            extra["head_dim"] = d["head_dim"]
        missing = [n for n in _REQUIRED if n not in known]
        if missing:
            raise TinychatError(f"config.json: missing required field(s) {', '.join(missing)}; "
                                "is this a LLaMA-family Hugging Face config? re-download it")
        return cls(**known, extra=extra)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg = path / "config.json"
        if not path.exists():
            raise TinychatError(f"{path}: no such model directory; give a model directory or a known model name")
        if not cfg.is_file():
            raise TinychatError(f"{path}: no config.json in this directory; give a Hugging Face model directory "
                                "(config.json, *.safetensors and tokenizer files)")
        try:
            d = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinychatError(f"{cfg}: not valid JSON ({e}); re-download the model") from None
        if not isinstance(d, dict):
            raise TinychatError(f"{cfg}: expected a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return {k: v for k, v in d.items() if v is not None}
