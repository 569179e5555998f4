"""The decode step as one CUDA graph: all layers, the lm_head and (when it can be) the sampler, replayed
per token with no Python work per layer and no host synchronisation inside the step.

Why a separate forward: LlamaForCausalLM.forward reads `cache.offset` as a Python int (slicing,
masks, positions), which a captured graph would freeze. `decode_forward` is the same math for one new
token per sequence, written against static buffers: the token ids and the cache position are device
tensors, the KV cache is written at that position by the fused RoPE kernel and attention reads the
valid length from device memory. It uses tinychat.ops, so each step is a CUDA kernel where one runs and
the torch reference otherwise (which is how the CPU tests exercise it); the eager model is untouched.

DecodeGraph captures decode_forward once per KV cache storage (shape and tensors). A later cache of
the same shape adopts the graph's storage when the previous cache object is gone, so the chat, the
bench and one-shot generation capture once per shape. SamplerGraph captures the sampler on the
graph's logits (greedy always; seeded sampling where torch lets a custom generator be captured) and
writes the token back into the graph's input, so the next replay needs no copy.

Used by tinychat.generate.generate_step through `graph_decoder`, only for fp16 models on a CUDA device
with the kernels available; TINYCHAT_CUDA_GRAPH=0 turns it off.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Callable

import torch

from . import ops
from .cache import KVCache
from .ops import cuda_ops, reference

MAX_GRAPHS_PER_MODEL = 2
MAX_SAMPLER_GRAPHS = 4


# ---- the decode forward on static buffers ----------------------------------------------------------

def _linear(module, x: torch.Tensor) -> torch.Tensor:
    if getattr(module, "path", None) == "cuda":  # AWQLinear in the GEMV layout: call the kernel directly
        return ops.gemv_w4a16(x, module.qweight_t, module.scales_zeros, module.group_size, module.bias)
    return module(x)


def _gate_up_silu(mlp, x: torch.Tensor) -> torch.Tensor:
    proj = mlp.gate_up_proj
    if getattr(proj, "path", None) == "cuda" and proj.bias is None:
        return ops.gemv_w4a16(x, proj.qweight_t, proj.scales_zeros, proj.group_size, silu=True)
    return ops.silu_mul(proj(x))


def decode_forward(model, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: torch.Tensor,
                   pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_splits: int | None = None) -> torch.Tensor:
    """Logits [B, vocab] for tokens [B, 1] at cache position pos (int32 [1], device), writing their k/v.

    The same computation as model(tokens, cache)[:, -1] with cache.offset == pos, in the model's dtype;
    it neither reads nor advances any Python-side cache state.
    """
    config = model.config
    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    b = tokens.shape[0]
    inner = model.model
    h = inner.embed_tokens(tokens[:, 0])  # [B, hidden]
    delta = None
    for i, layer in enumerate(inner.layers):
        x, h = ops.add_rmsnorm(h, layer.input_layernorm.weight, layer.input_layernorm.eps, delta)
        attn = layer.self_attn
        qkv = _linear(attn.qkv_proj, x)
        q = ops.rope_kv_write(qkv.view(b, 1, -1), cos, sin, pos, keys[i], values[i], n_heads, n_kv, head_dim)
        o = ops.decode_attention(q.view(b, n_heads, head_dim), keys[i], values[i], pos, config.sliding_window,
                                 n_splits)
        delta = _linear(attn.o_proj, o.view(b, n_heads * head_dim))
        x, h = ops.add_rmsnorm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps, delta)
        delta = _linear(layer.mlp.down_proj, _gate_up_silu(layer.mlp, x))
    x, _ = ops.add_rmsnorm(h, inner.norm.weight, inner.norm.eps, delta)
    return model.lm_head(x)


# ---- graphs ------------------------------------------------------------------------------------------

def unsupported_reason(model, cache: KVCache) -> str | None:
    """None when the decode step of this model and cache can be captured, else why not."""
    from .models.llama import LlamaForCausalLM

    if os.environ.get("TINYCHAT_CUDA_GRAPH", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by TINYCHAT_CUDA_GRAPH=0"
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a tinychat LLaMA-family model"
    if model.device.type != "cuda":
        return "the model is not on a CUDA device"
    if model.dtype != torch.float16:
        return f"the CUDA kernels compute in fp16, the model is {model.dtype}"
    reason = ops.unavailable_reason(model.device)
    if reason is not None:
        return reason
    if cache.keys[0].dtype != torch.float16 or cache.keys[0].device != model.device:
        return "the KV cache is not fp16 on the model's device"
    return None


def _cache_key(cache: KVCache) -> tuple:
    k = cache.keys[0]
    return (len(cache.keys), tuple(k.shape), k.dtype, k.device)


class DecodeGraph:
    """decode_forward captured for one model and one KV cache storage."""

    def __init__(self, model, cache: KVCache):
        self.model = model
        self.key = _cache_key(cache)
        self.keys, self.values = list(cache.keys), list(cache.values)  # the storage the graph writes
        self._cache = weakref.ref(cache)
        device = model.device
        self.batch = cache.keys[0].shape[0]
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.int32, device=device)
        self.cos, self.sin = reference.rope_tables(model.rotary.inv_freq, cache.max_seq, model.dtype, device)
        self.n_splits = cuda_ops.attention_splits(self.batch, model.config.num_key_value_heads, cache.max_seq, device)
        self._pos_host = None
        self.sampler_graphs: list[tuple[Callable, SamplerGraph | None]] = []
        with torch.inference_mode():  # static buffers are inference tensors: every later use is in this mode
            self._capture(cache)

    def _forward(self) -> torch.Tensor:
        return decode_forward(self.model, self.keys, self.values, self.tokens, self.pos, self.cos, self.sin,
                              self.n_splits)

    def _capture(self, cache: KVCache) -> None:
        # Warm up eagerly at the first free slot (harmless: slots >= offset hold nothing valid): this
        # runs every kernel's first-use self-check and lets cuBLAS set up, both of which must precede capture.
        self.pos.fill_(min(cache.offset, cache.max_seq - 1))
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
            self.pos.add_(1)
        self._pos_host = None

    # -- binding to a cache --
    def bound_to(self, cache: KVCache) -> bool:
        return self._cache() is cache and cache.keys[0] is self.keys[0]

    def can_adopt(self, cache: KVCache) -> bool:
        """A different cache of the same shape may take over this graph's storage when the cache the
        graph was bound to is gone and the new one holds nothing yet."""
        return self._cache() is None and _cache_key(cache) == self.key and cache.offset == 0

    def adopt(self, cache: KVCache) -> None:
        cache.keys[:] = self.keys
        cache.values[:] = self.values
        self._cache = weakref.ref(cache)
        self._pos_host = None

    # -- one step --
    def __call__(self, token: torch.Tensor, skip_copy: bool = False) -> torch.Tensor:
        """Decode `token` ([B] or [B, 1]) at the bound cache's offset; returns the logits [B, vocab]
        (a static buffer, overwritten by the next step) and advances the cache like the model does."""
        cache = self._cache()
        cache.check_room(1)
        ids = (self.tokens if skip_copy else token.view(self.batch, 1)).cpu()  # the GPU is idle here anyway
        with torch.inference_mode():
            if not skip_copy:
                self.tokens.copy_(token.view(self.batch, 1))
            if self._pos_host != cache.offset:
                self.pos.fill_(cache.offset)
        self.graph.replay()
        self._pos_host = cache.offset + 1
        cache.advance(ids)  # host-side bookkeeping from the host copy: no wait for the replay
        return self.logits


class SamplerGraph:
    """A sampler captured on a DecodeGraph's logits; writes the token into the decode graph's input."""

    def __init__(self, decode: DecodeGraph, sampler: Callable):
        self.decode = decode
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # register_generator_state is a deprecated no-op in newer torch
            stream = torch.cuda.Stream(decode.model.device)
            stream.wait_stream(torch.cuda.current_stream(decode.model.device))
            with torch.cuda.stream(stream):
                sampler(decode.logits)  # creates the sampler's generator outside the capture
            torch.cuda.current_stream(decode.model.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            for generator in _generators_of(sampler):
                if hasattr(self.graph, "register_generator_state"):
                    self.graph.register_generator_state(generator)
            with torch.cuda.graph(self.graph):
                self.token = sampler(decode.logits).view(decode.batch)
                decode.tokens.copy_(self.token.view(decode.batch, 1))

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.token


def _generators_of(sampler: Callable) -> list[torch.Generator]:
    """The CUDA generators a make_sampler closure draws from (best effort: its closure cells)."""
    found = []
    for cell in getattr(sampler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        values = value.values() if isinstance(value, dict) else (value,)
        found += [g for g in values if isinstance(g, torch.Generator) and g.device.type == "cuda"]
    return found


def decode_graph(model, cache: KVCache) -> DecodeGraph:
    """The model's captured decode step for this cache: reused, adopted, or captured now."""
    graphs: list[DecodeGraph] = model.__dict__.setdefault("_tinychat_decode_graphs", [])
    for g in graphs:
        if g.bound_to(cache):
            return g
    for g in graphs:
        if g.can_adopt(cache):
            g.adopt(cache)
            return g
    g = DecodeGraph(model, cache)
    graphs.append(g)
    while len(graphs) > MAX_GRAPHS_PER_MODEL:
        graphs.pop(0)
    return g


def release_graphs(model) -> None:
    """Drop the model's captured graphs (and the KV storage they hold on to)."""
    model.__dict__.pop("_tinychat_decode_graphs", None)


def graph_decoder(model, cache: KVCache, sampler: Callable, processors=()) -> tuple[Callable, Callable] | None:
    """(step, sample) for generate_step, or None when the decode step cannot be captured.

    step(token) -> logits [B, vocab] replays the decode graph (and, if captured, the sampler graph);
    sample(logits) returns the token the sampler graph drew when given that step's logits, and calls
    `sampler` otherwise (the prefill's logits, or logits changed by processors).
    """
    reason = unsupported_reason(model, cache)
    if reason is not None or model.__dict__.get("_tinychat_graph_failed"):
        return None
    try:
        dec = decode_graph(model, cache)
    except Exception as e:  # never let the fast path break generation: decode eagerly instead
        torch.cuda.synchronize(model.device)
        model.__dict__["_tinychat_graph_failed"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"tinychat: capturing the decode step as a CUDA graph failed ({type(e).__name__}: {e}); "
                      "decoding eagerly", RuntimeWarning, stacklevel=2)
        return None
    sampled = None
    if not processors:  # processors need the growing history, which a graph cannot hold
        entry = next((e for e in dec.sampler_graphs if e[0] is sampler), None)
        if entry is None:
            try:
                entry = (sampler, SamplerGraph(dec, sampler))
            except Exception as e:  # a sampler torch cannot capture: sample eagerly instead
                torch.cuda.synchronize(model.device)
                warnings.warn(f"tinychat: sampling stays outside the CUDA graph ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)
                entry = (sampler, None)
            # The entry holds the sampler itself, so a new sampler can never be mistaken for it; a few
            # are kept (each generation call makes a new one; greedy is always the same function).
            dec.sampler_graphs = [entry] + dec.sampler_graphs[:MAX_SAMPLER_GRAPHS - 1]
        sampled = entry[1]
    state = {"token": None}

    def step(token: torch.Tensor) -> torch.Tensor:
        own = state["token"] is not None and token is state["token"]
        logits = dec(token, skip_copy=own)
        state["token"] = sampled() if sampled is not None else None
        return logits

    def sample(logits: torch.Tensor) -> torch.Tensor:
        if state["token"] is not None and logits is dec.logits:
            return state["token"]
        state["token"] = None
        return sampler(logits)

    return step, sample
