"""Capture and replay of `model.decode_step` as CUDA graphs: all layers, the lm_head and (where torch can
capture it) the sampler, replayed per token with no Python work per layer.

Nothing here restates the model's math: a DecodeGraph is a tinychat.static_step.CapturedStep, the step
on static buffers, so what is captured is exactly the code the CPU runs eagerly and the tests check.
SamplerGraph captures the sampler on the graph's logits and writes the token back into the graph's input,
so the next replay needs no copy.

GraphDecoder owns a model's captured steps (the engine holds one): CUDA graphs on a GPU, recorded kernel
programs on the CPU (tinychat.cpu_graph); one per KV cache storage, reused by later caches of the same
shape (the chat, the bench and one-shot generation capture once per shape).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from . import cpu_graph, ops
from .cache import KVCache, KVStorage
from .static_step import CapturedStep, unmet_requirement

MAX_GRAPHS = 2
MAX_SAMPLER_GRAPHS = 4


def unsupported_reason(model, cache: KVStorage) -> str | None:
    """None when the decode step of this model and cache can be captured as a CUDA graph, else why not."""
    return unmet_requirement(model, cache, "cuda", torch.float16, lambda: ops.unavailable_reason(model.device))


class DecodeGraph(CapturedStep):
    """A StaticStep captured as a CUDA graph for one KV cache storage."""

    def __init__(self, model, cache: KVStorage, positions: torch.Tensor, tokens: torch.Tensor | None = None):
        self.sampler_graphs: list[tuple[Callable, SamplerGraph | None]] = []
        super().__init__(model, cache, positions, tokens)

    def _capture(self) -> None:
        # Warm up eagerly first: this runs every kernel's first-use self-check and lets cuBLAS set up, both
        # of which must precede capture.
        device = self.model.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self()

    def _launch(self) -> None:
        self.graph.replay()


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


def step_class(model, cache: KVStorage) -> type[CapturedStep] | None:
    """How this model's decode step with this cache is captured: a CUDA graph, recorded CPU kernel calls, or
    not at all (None)."""
    if unsupported_reason(model, cache) is None:
        return DecodeGraph
    if cpu_graph.unsupported_reason(model, cache) is None:
        return cpu_graph.CpuGraph
    return None


class GraphDecoder:
    """The decode loop's (step, sample) pair from captured graphs; one per model, held by its engine.

    lookahead: the step for token n is queued before the host reads token n, so the GPU computes while
    Python samples, detokenizes and prints.
    """

    lookahead = True  # generate_step queues ahead only on a GPU (on the CPU a replay runs as it is called)

    def __init__(self):
        self.graphs: list[CapturedStep] = []
        self.failed: str | None = None  # a capture failed once: decode eagerly from then on
        self.used = "eager"  # what decoded the last bound generation: "cuda-graph", "cpu-graph" or "eager"

    def graph_for(self, model, cache: KVCache) -> CapturedStep:
        for g in self.graphs:
            if g.model is model and g.bound_to(cache):
                return g
        for g in self.graphs:
            if g.model is model and g.can_adopt(cache):
                g.adopt(cache)
                return g
        if cache.offset >= cache.max_seq:
            raise ValueError("the cache is full: no free slot to capture the decode step in")
        positions = torch.full((cache.keys[0].shape[0],), cache.offset, dtype=torch.long, device=model.device)
        g = step_class(model, cache)(model, cache, positions)
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
        self.used = "eager"
        if self.failed or cache.room == 0 or step_class(model, cache) is None:
            return None
        try:
            dec = self.graph_for(model, cache)
        except cpu_graph.Uncapturable as e:  # torch computes part of this model's step: expected, eager
            self.failed = str(e)
            return None
        except Exception as e:  # never let the fast path break generation: decode eagerly instead
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"tinychat: capturing the decode step failed ({self.failed}); decoding eagerly",
                          RuntimeWarning, stacklevel=2)
            return None
        self.used = "cuda-graph" if isinstance(dec, DecodeGraph) else "cpu-graph"
        # sampling is captured in CUDA graphs only (a CPU step returns its logits to the eager sampler)
        sampled = None if processors or not hasattr(dec, "sampler_graphs") else self._sampler_graph(dec, sampler)
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
