"""The LLaMA family in one file: Llama 1/2/3, Mistral (sliding window), SmolLM, Qwen2 (q/k/v bias), Qwen3
(per-head q/k RMSNorm). Its pieces (attention, MLP, the causal LM) also serve tinychat.models.gemma3.

Attribute names follow Hugging Face (`model.layers.N.self_attn...`) except that q/k/v and gate/up are
fused into `qkv_proj` and `gate_up_proj`; the loader builds those from the HF tensors.

The math is written once, in `LlamaForCausalLM.run(input_ids, positions, cache)`, against tinychat.ops:
prompts, chunked prefill and decode all go through it, on every device. Positions are a device tensor
and the cache is written by index, so `decode_step` (run with one token per sequence) is what the CUDA
graph captures (tinychat.cuda_graph) and what the CPU runs eagerly; `forward(input_ids, cache)` is the
convenience that reads the positions off the cache and advances it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..cache import KVCache, KVStorage, LayerKV, kv_cache_dtype
from ..config import ModelConfig
from . import ScaleGroup
from . import embed_scale as family_embed_scale

# Default cache length: a Llama-3 128k context would preallocate gigabytes that a chat rarely uses.
DEFAULT_MAX_CONTEXT = 8192
MIN_TABLE_POSITIONS = 256  # rotary tables cover at least this many positions (short runs share one table)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.add_rmsnorm(x, self.weight, self.eps)[0]

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual add fused in front of the norm (one kernel on a GPU)."""
        return ops.add_rmsnorm(x, self.weight, self.eps, delta)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with `linear` and `llama3` rope scaling applied (HF's definitions)."""
    dim = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = scaling or {}
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
    """RoPE in HF's rotate-half convention: the inverse frequencies, and the tables for given positions.

    Tables by kind: "global" (rope_theta with the config's scaling) for every model, and "local"
    (rope_local_base_freq, unscaled) where sliding layers rotate at their own base (Gemma 3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        frequencies = self._frequencies()
        self.kinds = tuple(frequencies)  # fixed by the config: forward runs every step, so it is not recomputed
        self._table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (kind, dtype, device) -> tables
        # Tables a longer cache superseded: a captured decode step (a CUDA graph) may still read them.
        self._superseded: list[tuple[torch.Tensor, torch.Tensor]] = []
        for kind, inv_freq in frequencies.items():
            self.register_buffer(self._buffer(kind), inv_freq, persistent=False)

    def _frequencies(self) -> dict[str, torch.Tensor]:
        c = self.config
        out = {"global": rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)}
        if c.rope_local_base_freq is not None:
            out["local"] = rope_inv_freq(c.head_dim, c.rope_local_base_freq, None)
        return out

    @staticmethod
    def _buffer(kind: str) -> str:
        return "inv_freq" if kind == "global" else f"inv_freq_{kind}"

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) must move the frequencies but never round them: they stay fp32, as HF's
        super()._apply(fn, recurse)
        for kind, inv_freq in self._frequencies().items():
            setattr(self, self._buffer(kind), inv_freq.to(self.inv_freq.device))
        self._table_cache.clear()
        self._superseded.clear()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                n_positions: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, signed_sin) of each kind at `positions` (all < n_positions: the cache's length): rows of
        tables built once for positions 0..n_positions-1 by ops.rope_cos_sin, identical bit for bit to
        building them at the positions themselves (elementwise fp32 math), and a lookup a decode step can
        replay (tinychat.cpu_graph) where cos/sin could not be."""
        device = positions.device
        return {kind: tuple(ops.take_rows(t, positions) for t in self._tables(kind, dtype, n_positions, device))
                for kind in self.kinds}

    def _tables(self, kind: str, dtype: torch.dtype, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, dtype, device)
        tables = self._table_cache.get(key)
        if tables is None or tables[0].shape[0] < n:
            positions = torch.arange(max(n, MIN_TABLE_POSITIONS), device=device)
            cos, sin = ops.rope_cos_sin(getattr(self, self._buffer(kind)), positions, dtype)
            if tables is not None:
                self._superseded.append(tables)
            tables = self._table_cache[key] = (cos, sin)
        return tables


class Step:
    """What every layer of one `run` needs besides its input, built once: the positions [B or 1, T],
    their rope tables by kind (see RotaryEmbedding), and where keys/values go (the cache's layers, or
    scratch buffers without one)."""

    def __init__(self, positions: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 cache: KVStorage | None):
        self.positions, self.ropes, self.cache = positions, ropes, cache
        self.last_positions = positions[:, -1]  # with one token per sequence: each row's position [B or 1]

    def kv(self, layer: int, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device) -> LayerKV:
        if self.cache is not None:
            return self.cache.layer(layer)
        # No cache: this call's tokens only, at positions 0..T-1 (batch-agnostic, so the quantizer can
        # replay a layer on a subset of the sequences it was captured with)
        shape = (batch, n_kv, self.positions.shape[-1], head_dim)
        return LayerKV(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))


def sequence_step(rotary: RotaryEmbedding, seqlen: int, dtype: torch.dtype, device) -> Step:
    """The Step of whole sequences of `seqlen` tokens without a cache (the quantizer runs blocks on these)."""
    positions = torch.arange(seqlen, device=device).unsqueeze(0)
    return Step(positions, rotary(positions, dtype, seqlen), None)


class Attention(nn.Module):
    """Fused q/k/v, optional per-head q/k RMSNorm before the rotation (Qwen3, Gemma 3), rope of the layer's
    kind, attention over the layer's window (config.layer_window)."""

    def __init__(self, config: ModelConfig, layer_idx: int, qk_norm: bool = False, rope: str = "global"):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.window, self.rope = config.layer_window(layer_idx), rope
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _qk_normed(self, qkv: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "q_norm"):
            return qkv
        return ops.qk_rmsnorm(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.n_heads,
                              self.n_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self._qk_normed(self.qkv_proj(x))
        kv = step.kv(self.layer_idx, b, self.n_kv_heads, self.head_dim, qkv.dtype, qkv.device)
        scales = {"k_scale": kv.key_scales, "v_scale": kv.value_scales}  # None unless the cache is int8
        cos, sin = step.ropes[self.rope]
        q = ops.rope_kv_write(qkv, cos, sin, step.positions, kv.keys, kv.values,
                              self.n_heads, self.n_kv_heads, self.head_dim, **scales)
        if t == 1:  # one new token per sequence: the decode kernel, over each row's own length
            out = ops.decode_attention(q.view(b, self.n_heads, self.head_dim), kv.keys, kv.values,
                                       step.last_positions.expand(b).contiguous(), self.window, **scales)
        else:
            out = ops.attention(q, kv.keys, kv.values, step.positions, self.window, **scales)
        return self.o_proj(out.reshape(b, t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.gate_up_proj, "forward_silu_mul", None)  # a quantized strategy may fuse it (GEMV)
        if fused is not None:
            return self.down_proj(fused(x))
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, qk_norm=has_qk_norm(config))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        normed, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), step))
        return ops.add(h, self.mlp(normed))


class Embedding(nn.Embedding):
    """nn.Embedding looked up through ops.take_rows (a kernel on the CPU that a decode step can replay)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.take_rows(self.weight, ids)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layer=DecoderLayer):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The causal LM every family shares: embed (times `embed_scale` where the family scales it), the
    decoder layers, the final norm, the head. A family differs in its DecoderLayer (and config)."""

    Layer = DecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_scale = family_embed_scale(config)
        self.model = LlamaModel(config, self.Layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.device("cpu"):  # inv_freq is computed, never loaded: keep it off the meta device
            self.rotary = RotaryEmbedding(config)
        self.kv_cache: str | None = None  # make_cache's storage (--kv-cache): None = the compute dtype

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVStorage | None = None,
            last_only: bool = False, return_hidden: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """The model's math: input_ids [B, T] at positions [B or 1, T] (int64, on the model's device) ->
        logits [B, T or 1, vocab] (or the final hidden states). Keys/values are written into `cache` at
        those positions (without a cache, positions must be 0..T-1); the cache's bookkeeping (offset,
        token ids) is the caller's, so this can be captured as a CUDA graph. With last_only, each row's
        logits at index last[b] of T instead of the final one (prompts of several lengths padded to one:
        a padded row's tokens after its last one only write keys/values that nothing reads before the
        row's next tokens overwrite them)."""
        n_positions = cache.keys[0].shape[2] if cache is not None else input_ids.shape[1]
        step = Step(positions, self.rotary(positions, self.dtype, n_positions), cache)
        h = self.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h, step)
        if last_only:
            h = h[:, -1:] if last is None else h[torch.arange(h.shape[0], device=h.device), last].unsqueeze(1)
        h = self.model.norm(h)
        return h if return_hidden else self.lm_head(h)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the first block takes them."""
        h = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:  # as HF's scaled embedding: the factor rounded to the embedding's dtype
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        return h

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVStorage) -> torch.Tensor:
        """One new token per sequence: tokens [B] at positions [B] (device tensors) -> logits [B, vocab]."""
        return self.run(tokens.view(-1, 1), positions.view(-1, 1), cache)[:, 0]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [batch, T] -> logits [batch, T or 1, vocab]. With a cache, positions continue from its
        offset and the cache advances past these tokens."""
        t = input_ids.shape[1]
        offset = 0
        if cache is not None:
            cache.check_room(t)
            offset = cache.offset
        positions = torch.arange(offset, offset + t, device=input_ids.device).unsqueeze(0)
        out = self.run(input_ids, positions, cache, last_only, return_hidden)
        if cache is not None:
            cache.advance(input_ids)
        return out

    def make_cache(self, max_seq: int | None = None, batch: int = 1, kv_cache: str | None = None) -> KVCache:
        """A cache for up to max_seq positions (default: the model's context, at most DEFAULT_MAX_CONTEXT),
        stored as kv_cache ("fp16", "bf16", "int8"; default: self.kv_cache, else the compute dtype)."""
        max_seq = max_seq or min(self.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        dtype = kv_cache_dtype(kv_cache or self.kv_cache, self.dtype)
        return KVCache(self.config, max_seq, batch, dtype=dtype, device=self.device, scale_dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # norms always stay in the compute dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device


FP16_SAFE = True  # activations stay within fp16's range (tinychat.engine picks the compute dtype by it)
Model = LlamaForCausalLM
Layer = DecoderLayer


# ---- the checkpoint layout (see tinychat.models) -------------------------------------------------------

def has_qk_norm(config: ModelConfig) -> bool:
    return config.model_type == "qwen3"


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF names (relative to the block) and shapes of one decoder block's tensors: the one table."""
    h, hd, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn)}
    if config.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if has_qk_norm(config):
        shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    return shapes


FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}

SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    # Only where v's outputs are o's inputs one to one, i.e. not under GQA (as in llm-awq / AutoAWQ).
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", per_token=True),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# Linears whose clip search is skipped (q/k: their error goes through softmax)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def embed_scale(config: ModelConfig) -> float | None:
    return None


def to_model(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return t


def to_hf(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return t
