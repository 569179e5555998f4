"""Gemma 3 text models (model_type gemma3_text): the LLaMA block's pieces, arranged Gemma's way.

What differs from LLaMA, and where it lives:
- embeddings scaled by sqrt(hidden_size) (`embed_scale`, applied by the shared LlamaForCausalLM.run);
- RMSNorm weights stored as w with (1 + w) applied: converted to (1 + w) when read (`to_model`) and back
  when written (`to_hf`), so every norm here, and AWQ's folding into it, is the plain RMSNorm;
- a norm after attention and after the MLP as well as before each (four per block), q/k RMSNorm per head;
- a GELU-tanh gated MLP;
- sliding-window layers ("sliding_attention", rotating at rope_local_base_freq) interleaved with global
  ones (rope_theta, with the config's scaling): each layer takes its window and rope kind;
- attention scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2: folded into q_norm's
  weight at load (a factor on q passes through the rotation unchanged), so the attention ops are shared.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from . import ScaleGroup
from .llama import FUSED, NO_CLIP, MLP, Attention, LlamaForCausalLM, RMSNorm, Step  # noqa: F401 (FUSED, NO_CLIP: layout)
from .llama import layer_shapes as llama_layer_shapes


class GeluMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.gelu_tanh_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        local = config.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(config, layer_idx, qk_norm=True, rope="local" if local else "global")
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = GeluMLP(config)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        attn = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), step))
        normed, h = self.pre_feedforward_layernorm.add_and_norm(x, attn)
        return h + self.post_feedforward_layernorm(self.mlp(normed))


class Gemma3ForCausalLM(LlamaForCausalLM):
    Layer = DecoderLayer


FP16_SAFE = False  # its residual stream overflows fp16 (HF runs Gemma in bf16 or fp32 too)
Model = Gemma3ForCausalLM
Layer = DecoderLayer


# ---- the checkpoint layout (see tinychat.models) -------------------------------------------------------

def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, hd = config.hidden_size, config.head_dim
    return {**llama_layer_shapes(config),
            "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
            "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}


SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # only without GQA
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", per_token=True),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def embed_scale(config: ModelConfig) -> float:
    return config.hidden_size ** 0.5


def _norm_factor(config: ModelConfig, name: str) -> float | None:
    """What our module's weight is the HF weight's (1 + w) times, for a norm; None for other tensors."""
    if not name.endswith("norm.weight"):
        return None
    if name.endswith("self_attn.q_norm.weight"):
        return math.sqrt(config.head_dim / config.query_pre_attn_scalar)
    return 1.0


def to_model(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    factor = _norm_factor(config, name)
    return t if factor is None else ((t.float() + 1.0) * factor).to(t.dtype)


def to_hf(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    factor = _norm_factor(config, name)
    return t if factor is None else (t.float() / factor - 1.0).to(t.dtype)
