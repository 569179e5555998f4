"""Capture and replay of `model.decode_step` as CUDA graphs: all layers, the lm_head and (where torch can
capture it) the sampler, replayed per token with no Python work per layer.

Nothing here restates the model's math: a DecodeGraph calls model.decode_step on static buffers (token
ids and positions as device tensors; the step writes the KV cache by index and attention reads each
row's length from the positions), so what is captured is exactly the code the CPU runs eagerly and the
tests check. SamplerGraph captures the sampler on the graph's logits and writes the token back into
the graph's input, so the next replay needs no copy.

GraphDecoder owns a model's graphs (the engine holds one): a graph per KV cache storage, reused by later
caches of the same shape (the chat, the bench and one-shot generation capture once per shape).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch

from . import ops
from .cache import KVCache, KVStorage

MAX_GRAPHS = 2
MAX_SAMPLER_GRAPHS = 4


def unsupported_reason(model, cache: KVCache) -> str | None:
    """None when the decode step of this model and cache can be captured, else why not."""
    if not hasattr(model, "decode_step"):
        return f"{type(model).__name__} has no decode_step"
    if model.device.type != "cuda":
        return "the model is not on a CUDA device"
    if model.dtype != torch.float16:
        return f"the CUDA kernels compute in fp16, the model is {model.dtype}"
    reason = ops.unavailable_reason(model.device)
    if reason is not None:
        return reason
    if cache.keys[0].dtype not in (torch.float16, torch.int8) or cache.keys[0].device != model.device:
        return "the KV cache is neither fp16 nor int8 on the model's device"
    return None


def _cache_key(cache: KVStorage) -> tuple:
    k = cache.keys[0]
    return (len(cache.keys), tuple(k.shape), k.dtype, k.device, cache.quantized)


class StaticStep:
    """model.decode_step on static buffers (token ids and positions [B] on the model's device, the cache's
    storage): exactly what a DecodeGraph captures; it runs eagerly anywhere, which is how the CPU tests
    check the captured code."""

    def __init__(self, model, cache: KVCache):
        self.model = model
        # The storage the step writes, apart from the cache object (which may die and be replaced by a
        # new cache adopting this storage); decode_step reads only the tensors of what it is given.
        self.storage = KVStorage(list(cache.keys), list(cache.values), list(cache.key_scales),
                                 list(cache.value_scales))
        self.batch = cache.keys[0].shape[0]
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(self.batch, dtype=torch.long, device=model.device)

    def __call__(self) -> torch.Tensor:
        return self.model.decode_step(self.tokens, self.positions, self.storage)


class DecodeGraph(StaticStep):
    """A StaticStep captured as a CUDA graph for one KV cache storage."""

    def __init__(self, model, cache: KVCache):
        with torch.inference_mode():  # static buffers are inference tensors: every later use is in this mode
            super().__init__(model, cache)
            self.key = _cache_key(cache)
            self._owner = weakref.ref(cache)
            self.sampler_graphs: list[tuple[Callable, SamplerGraph | None]] = []
            self._capture(cache)

    def _capture(self, cache: KVCache) -> None:
        # Warm up eagerly at the first free slot (slots >= offset hold nothing valid): this runs every
        # kernel's first-use self-check and lets cuBLAS set up, both of which must precede capture.
        if cache.offset >= cache.max_seq:
            raise ValueError("the cache is full: no free slot to warm the graph up in")
        self.positions.fill_(cache.offset)
        device = self.model.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self()

    def bound_to(self, cache: KVCache) -> bool:
        return self._owner() is cache and cache.keys[0] is self.storage.keys[0]

    def can_adopt(self, cache: KVCache) -> bool:
        """A different cache of the same shape may take over this graph's storage when the cache the
        graph was bound to is gone."""
        return self._owner() is None and _cache_key(cache) == self.key

    def adopt(self, cache: KVCache) -> None:
        """Move the cache's valid positions (its prefill) into the graph's storage and hand it that storage."""
        with torch.inference_mode():
            for mine, theirs in zip(self.storage.tensors(), cache.tensors()):
                mine[:, :, :cache.offset].copy_(theirs[:, :, :cache.offset])
        cache.replace(self.storage)
        self._owner = weakref.ref(cache)

    def replay(self, token: torch.Tensor | None, position: int) -> torch.Tensor:
        """Decode `token` ([B]; None: the token a sampler graph already wrote) at `position`; returns the
        logits [B, vocab] (a static buffer, overwritten by the next replay)."""
        with torch.inference_mode():
            if token is not None:
                self.tokens.copy_(token.view(self.batch))
            self.positions.fill_(position)  # a device-side fill: no host sync
        self.graph.replay()
        return self.logits


class SamplerGraph:
    """A sampler captured on a DecodeGraph's logits; writes the token into the decode graph's input."""

    def __init__(self, decode: DecodeGraph, sampler: Callable):
        device = decode.model.device
        generator = sampler.generator(device) if hasattr(sampler, "generator") else None
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # register_generator_state is a deprecated no-op in newer torch
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            before = None if generator is None else generator.get_state()
            with torch.cuda.stream(stream):
                sampler(decode.logits)
            torch.cuda.current_stream(device).wait_stream(stream)
            if generator is not None:  # the warm-up draw must not shift the seeded sequence
                generator.set_state(before)
            self.graph = torch.cuda.CUDAGraph()
            if generator is not None and hasattr(self.graph, "register_generator_state"):
                self.graph.register_generator_state(generator)
            with torch.cuda.graph(self.graph):
                self.token = sampler(decode.logits).view(decode.batch)
                decode.tokens.copy_(self.token)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.token


class GraphDecoder:
    """The decode loop's (step, sample) pair from captured graphs; one per model, held by its engine.

    lookahead: the step for token n is queued before the host reads token n, so the GPU computes while
    Python samples, detokenizes and prints.
    """

    lookahead = True

    def __init__(self):
        self.graphs: list[DecodeGraph] = []
        self.failed: str | None = None  # a capture failed once: decode eagerly from then on

    def graph_for(self, model, cache: KVCache) -> DecodeGraph:
        for g in self.graphs:
            if g.model is model and g.bound_to(cache):
                return g
        for g in self.graphs:
            if g.model is model and g.can_adopt(cache):
                g.adopt(cache)
                return g
        g = DecodeGraph(model, cache)
        self.graphs = [g] + self.graphs[:MAX_GRAPHS - 1]
        return g

    def release(self) -> None:
        """Drop the captured graphs (and the KV storage they hold on to)."""
        self.graphs = []

    def bind(self, model, cache: KVCache, sampler: Callable, processors=()) -> tuple[Callable, Callable] | None:
        """(step, sample) for generate_step, or None when the decode step cannot be captured here.

        step(token, position) -> logits [B, vocab] replays the decode graph and, if captured, the sampler
        graph; sample(logits) returns the token the sampler graph drew for that step's logits, and calls
        `sampler` otherwise (the prefill's logits, or logits changed by processors).
        """
        if self.failed or cache.room == 0 or unsupported_reason(model, cache) is not None:
            return None
        try:
            dec = self.graph_for(model, cache)
        except Exception as e:  # never let the fast path break generation: decode eagerly instead
            torch.cuda.synchronize(model.device)
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"tinychat: capturing the decode step as a CUDA graph failed ({self.failed}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=2)
            return None
        sampled = None if processors else self._sampler_graph(dec, sampler)
        state = {"token": None}

        def step(token: torch.Tensor, position: int) -> torch.Tensor:
            logits = dec.replay(None if token is state["token"] else token, position)
            # a copy: the sampler graph's buffer is overwritten by the next replay, maybe before it is read
            state["token"] = sampled().clone() if sampled is not None else None
            return logits

        def sample(logits: torch.Tensor) -> torch.Tensor:
            if state["token"] is not None and logits is dec.logits:
                return state["token"]
            state["token"] = None
            return sampler(logits)

        return step, sample

    @staticmethod
    def _sampler_graph(dec: DecodeGraph, sampler: Callable) -> SamplerGraph | None:
        entry = next((e for e in dec.sampler_graphs if e[0] is sampler), None)
        if entry is None:
            try:
                entry = (sampler, SamplerGraph(dec, sampler))
            except Exception as e:  # a sampler torch cannot capture: sample eagerly instead
                torch.cuda.synchronize(dec.model.device)
                warnings.warn(f"tinychat: sampling stays outside the CUDA graph ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=3)
                entry = (sampler, None)
            # The entry holds the sampler itself, so a new sampler can never be mistaken for it; a few are
            # kept (each generation call makes a new one; greedy is always the same function).
            dec.sampler_graphs = [entry] + dec.sampler_graphs[:MAX_SAMPLER_GRAPHS - 1]
        return entry[1]
