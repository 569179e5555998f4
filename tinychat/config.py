"""ModelConfig: the model's shape, built from an HF config.json (unknown keys are ignored)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TinychatError

# model_type values served by tinychat/models/llama.py (SmolLM, Mistral, Qwen2 are LLaMA-shaped).
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


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
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default")) != "default":
                self.rope_scaling = self.rope_parameters
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.model_type == "mistral" and self.extra.get("use_sliding_window") is False:
            self.sliding_window = None
        self.validate()

    def validate(self) -> None:
        if self.model_type not in LLAMA_FAMILY:
            raise TinychatError(
                f"config.json: model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(LLAMA_FAMILY)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TinychatError(f"config.json: {name} must be a positive integer, got {value!r}")
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
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise TinychatError("config.json: rms_norm_eps and rope_theta must be positive")
        if self.mlp_bias:
            raise TinychatError("config.json: mlp_bias=true is not supported")
        if self.hidden_act not in ("silu", "swish"):
            raise TinychatError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise TinychatError(f"config.json: sliding_window must be a positive integer, got {self.sliding_window!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        # `extra` keeps the raw dict so fields can tell "absent" from "default" (head_dim, use_sliding_window).
        extra = {k: v for k, v in d.items() if k not in names}
        if "head_dim" in d and d["head_dim"] is not None:
            extra["head_dim"] = d["head_dim"]
        missing = [n for n in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if n not in known]
        if missing:
            raise TinychatError(f"config.json: missing required field(s) {', '.join(missing)}")
        return cls(**known, extra=extra)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg = path / "config.json"
        if not path.exists():
            raise TinychatError(f"{path}: no such model directory; give a model directory or a known model name")
        if not cfg.is_file():
            raise TinychatError(f"{path}: no config.json in this directory; is it a Hugging Face model directory?")
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
