"""The LLaMA family in one file: Llama 1/2/3, Mistral (sliding window), SmolLM, Qwen2-style q/k/v bias.

Attribute names follow Hugging Face (`model.layers.N.self_attn...`) except that q/k/v and gate/up are
fused into `qkv_proj` and `gate_up_proj`; the loader builds those from the HF tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig


# Default cache length: a Llama-3 128k context would preallocate gigabytes that a chat rarely uses.
DEFAULT_MAX_CONTEXT = 8192


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF does, so low-precision runs agree.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with `linear` and `llama3` rope scaling applied (HF's definitions)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        from ..errors import TinychatError

        raise TinychatError(f"config.json: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """RoPE in HF's rotate-half convention; angles computed per call in fp32 as HF does (no position cap)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._last = None  # (positions, dtype, cos, sin): every layer of one forward shares the tables

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, head_dim], broadcast over batch and heads
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.tables(positions, q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_mask(q_len: int, offset: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [q_len, offset + q_len] mask (True = attend), or None when plain full attention is right."""
    if q_len == 1 and (window is None or offset < window):
        return None  # one new token sees every cached position
    q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_pos = torch.arange(offset + q_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x, rope: RotaryEmbedding, positions, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, k, positions)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        causal = mask is None and t > 1  # no cache prefix and no window: SDPA's causal path is fastest
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, positions, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, positions, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.device("cpu"):  # inv_freq is computed, never loaded: keep it off the meta device
            self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [batch, T] -> logits [batch, T or 1, vocab]. With a cache, positions continue from it."""
        t = input_ids.shape[1]
        offset = cache.offset if cache is not None else 0
        if cache is not None:
            cache.check_room(t)
        positions = torch.arange(offset, offset + t, device=input_ids.device)
        mask = attention_mask(t, offset, self.config.sliding_window, input_ids.device)
        if mask is not None and offset == 0 and self.config.sliding_window is None:
            mask = None  # plain causal prefill
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, self.rotary, positions, mask, cache)
        if cache is not None:
            cache.advance(input_ids)
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        return h if return_hidden else self.lm_head(h)

    def make_cache(self, max_seq: int | None = None, batch: int = 1) -> KVCache:
        """A cache for up to max_seq positions (default: the model's context, at most DEFAULT_MAX_CONTEXT)."""
        max_seq = max_seq or min(self.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        return KVCache(self.config, max_seq, batch, dtype=self.dtype, device=self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # norms always stay in the compute dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device
