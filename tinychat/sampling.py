"""Sampling: pure functions on logits [..., vocab], assembled into a per-step sampler by a factory.

Every function does its math in fp32 (whatever float dtype comes in) and returns a new fp32
tensor; removed tokens get -inf. Nothing here reads a value back to the host, so a decode loop
on the GPU never stalls on sampling.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import ops
from .errors import TinychatError

Sampler = Callable[[Tensor], Tensor]
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]

# A head whose fp32 cumulative probability falls short of top_p by less than this counts as
# reaching it: softmax and cumsum rounding must not pull in one more token when the head sums
# to exactly p in exact arithmetic.
_TOP_P_TOLERANCE = 1e-6


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per earlier occurrence in the reply
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the reply already holds
    seed: int | None = None  # None: a fresh random seed per sampler
    max_tokens: int = 256

    def validate(self) -> SamplingParams:
        # `not (x >= lo)` rather than `x < lo` so that NaN is rejected too.
        if not _is_number(self.temperature) or not self.temperature >= 0:
            _bad("--temperature must be >= 0 (0 means greedy)", self.temperature)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _bad("--top-p must be in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            _bad("--top-k must be an integer >= 0 (0 disables it)", self.top_k)
        if not _is_number(self.min_p) or not 0 <= self.min_p < 1:
            _bad("--min-p must be in [0, 1)", self.min_p)
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0 \
                or math.isinf(self.repetition_penalty):
            _bad("--repetition-penalty must be a finite number > 0 (1 disables it)", self.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _bad(f"--{name.replace('_', '-')} must be in [-2, 2] (0 disables it)", value)
        if self.seed is not None and not _is_int(self.seed):
            _bad("--seed must be an integer", self.seed)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _bad("--max-tokens must be an integer >= 1", self.max_tokens)
        return self


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(what: str, value) -> None:
    raise TinychatError(f"{what}, got {value!r}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits.float() / temperature


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k highest logits; among equal logits the lower token id wins.

    k <= 0 or k >= vocab keeps everything.
    """
    logits = logits.float()
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    # The k-th largest value (torch.topk: no full sort, ~40x faster on a CPU for 49152 logits); every logit above
    # it stays, and of those equal to it the lowest ids fill the rest (torch.topk does not promise which).
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    return logits.masked_fill(~keep, -math.inf)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of top tokens whose probability sums to >= p (never fewer than one).

    Tokens are ranked by logit, ties by lower token id. p >= 1 keeps everything.
    """
    logits = logits.float()
    if p >= 1.0:
        return logits.clone()
    fast = ops.top_p(logits, p, _TOP_P_TOLERANCE)  # the CPU kernel: sorts only the head of the ranking
    if fast is not None:
        return fast
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the top token has
    # nothing above it (mass 0), so it always survives.
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_above >= p - _TOP_P_TOLERANCE
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is >= min_p times the top token's probability."""
    logits = logits.float()
    if min_p <= 0.0:
        return logits.clone()
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); no softmax needed.
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def apply_repetition_penalty(logits: Tensor, token_ids: Tensor, penalty: float) -> Tensor:
    """HF convention: each previously seen id has a positive logit divided by `penalty`, a negative
    one multiplied by it, once however often it occurred.

    token_ids is [seq] (same history for every row) or [batch, seq].
    """
    logits = logits.float()
    if penalty == 1.0 or token_ids.numel() == 0:
        return logits.clone()
    ids = token_ids.to(device=logits.device, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.expand(*logits.shape[:-1], ids.shape[-1])
    seen = logits.gather(-1, ids)
    penalized = torch.where(seen > 0, seen / penalty, seen * penalty)
    # Repeated ids scatter the same value, which is how each id is penalized only once.
    return logits.scatter(-1, ids, penalized)


def apply_frequency_presence(logits: Tensor, token_ids: Tensor, frequency: float, presence: float) -> Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counting each id's
    occurrences in token_ids ([seq] for every row, or [batch, seq])."""
    logits = logits.float()
    if token_ids.numel() == 0 or (frequency == 0 and presence == 0):
        return logits.clone()
    ids = token_ids.to(device=logits.device, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.expand(*logits.shape[:-1], ids.shape[-1])
    counts = torch.zeros_like(logits).scatter_add_(-1, ids, torch.ones_like(ids, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def greedy(logits: Tensor) -> Tensor:
    """The most likely token per row (lowest id on ties)."""
    return ops.argmax(logits)


def categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from softmax(logits) without a host sync.

    Inverse CDF: one uniform u per row and the first token whose cumulative probability exceeds u times
    the total; unlike torch.multinomial it needs no device-to-host copy, and unlike an exponential race
    (argmax p_i / E_i) one random number per row rather than one per token (torch drew 49152 exponentials
    in ~1.2 ms on a 2-core CPU). A removed token (probability 0) adds nothing to the sum: never drawn.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)
    total = cumulative[..., -1:]
    u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device, dtype=probs.dtype)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total
    token = torch.searchsorted(cumulative, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # a parallel scan's rounding can leave a removed token a sliver of the sum: never draw one (a grammar's
    # mask must hold); the most likely token instead, in that one-in-millions case
    fallback = ops.argmax(probs.reshape(-1, probs.shape[-1])).view(token.shape)
    return torch.where(probs.gather(-1, token) > 0, token, fallback).squeeze(-1)


def make_sampler(params: SamplingParams) -> Sampler:
    """logits [batch, vocab] -> token ids [batch] (int64, same device as the logits)."""
    params.validate()
    if params.temperature == 0:
        return greedy

    return RandomSampler(params)


class RandomSampler:
    """logits [batch, vocab] -> token ids [batch] drawn after temperature, top-k, top-p and min-p.

    It draws from its own generator, one per device, made on first use there (so a sampler built before
    the model is placed draws on the device the logits live on); `generator(device)` hands it out so a
    CUDA graph that captures the sampler can register its state.
    """

    def __init__(self, params: SamplingParams):
        self.temperature, self.top_k, self.top_p, self.min_p = params.temperature, params.top_k, params.top_p, \
            params.min_p
        # not torch's global RNG: building a sampler must not move it
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one generator
            device = torch.device("cuda", torch.cuda.current_device())
        found = self._generators.get(device)
        if found is None:
            found = self._generators[device] = torch.Generator(device=device)
            found.manual_seed(self.seed)
        return found

    def __call__(self, logits: Tensor) -> Tensor:
        generator = self.generator(logits.device)
        logits = apply_temperature(logits, self.temperature)
        if self.top_k > 0:
            logits = apply_top_k(logits, self.top_k)
        if self.top_p < 1.0:
            logits = apply_top_p(logits, self.top_p)
        if self.min_p > 0.0:
            logits = apply_min_p(logits, self.min_p)
        return categorical(logits, generator)


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """Processors run before the sampler, each (history_ids, logits) -> logits."""
    params.validate()
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition_penalty(history_ids: Tensor, logits: Tensor) -> Tensor:
            return apply_repetition_penalty(logits, history_ids, penalty)

        processors.append(repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        processors.append(FrequencyPresencePenalty(params.frequency_penalty, params.presence_penalty))
    return processors


class FrequencyPresencePenalty:
    """Penalizes the tokens of the reply only, as OpenAI and vLLM do: the history seen on the first call is the
    prompt, and later calls count what came after it. One instance serves one generation."""

    def __init__(self, frequency: float, presence: float):
        self.frequency, self.presence = frequency, presence
        self.prompt_len: int | None = None

    def __call__(self, history_ids: Tensor, logits: Tensor) -> Tensor:
        if self.prompt_len is None:
            self.prompt_len = history_ids.shape[-1]
        return apply_frequency_presence(logits, history_ids[..., self.prompt_len:], self.frequency, self.presence)
