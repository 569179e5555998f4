"""Generation as a stack of generators: generate_step (token ids) -> stream_generate (text deltas + stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import KVCache
from .errors import TinychatError
from .sampling import SamplingParams, make_logits_processors, make_sampler
from .tokenizer import StreamingDetokenizer, Tokenizer

PREFILL_CHUNK = 512  # long prompts are prefilled in chunks so activations stay bounded


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of the prefill; the decode rate counts the tokens after it
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens ({self.prefilled_tokens} prefilled) at "
                f"{self.prefill_tps:.1f} tok/s, time to first token {self.time_to_first_token:.2f} s; "
                f"{self.generated_tokens} generated at {self.decode_tps:.1f} tok/s")


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response (may be empty while bytes are held back)
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "interrupted"
    stats: GenerationStats = field(default_factory=GenerationStats)


def prefill(model, cache: KVCache, prompt_ids: list[int], chunk: int = PREFILL_CHUNK) -> tuple[torch.Tensor, int]:
    """Run the prompt through the model, reusing the cached shared prefix.

    Returns the last position's logits [batch, vocab] and how many tokens were actually computed.
    """
    start = cache.reuse_prefix(prompt_ids)
    new = torch.tensor([prompt_ids[start:]], dtype=torch.long, device=model.device)
    cache.check_room(new.shape[1])
    logits = None
    for i in range(0, new.shape[1], chunk):
        logits = model(new[:, i:i + chunk], cache, last_only=True)
    return logits[:, -1], new.shape[1]


class EagerDecoder:
    """model.decode_step called eagerly, one token at a time (--decode eager, and where no capture applies)."""

    lookahead = False  # nothing is queued: each step runs as it is called
    used = "eager"  # what decoded the last generation (GraphDecoder's says which capture, if any)

    def bind(self, model, cache: KVCache, sampler: Callable, processors=()) -> tuple[Callable, Callable]:
        device = model.device

        def step(token: torch.Tensor, position: int) -> torch.Tensor:
            positions = torch.full((1,), position, dtype=torch.long, device=device)
            return model.decode_step(token.view(1), positions, cache)

        return step, sampler


DECODE_CHOICES = ("auto", "graph", "eager")


def make_decoder(kind: str = "auto"):
    """The decode implementation for --decode: "graph" replays the captured step where the model and cache
    allow it (a CUDA graph, or on the CPU the recorded kernel calls of tinychat.cpu_graph) and decodes
    eagerly elsewhere, "eager" never captures, "auto" is "graph"."""
    if kind not in DECODE_CHOICES:
        raise TinychatError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {kind!r}")
    if kind == "eager":
        return EagerDecoder()
    from .cuda_graph import GraphDecoder

    return GraphDecoder()


def generate_step(model, prompt_ids: list[int], cache: KVCache, sampler: Callable,
                  processors: list[Callable] = (), max_tokens: int = 256,
                  stats: GenerationStats | None = None, decoder=None) -> Iterator[int]:
    """Yield sampled token ids one at a time; stops after max_tokens or when the cache is full.

    decoder: EagerDecoder (the default) or a GraphDecoder (tinychat.cuda_graph), whose graphs it keeps.
    The cache ends holding the prompt and every yielded token except the last (which was never fed back).
    The host reads each token once (its id is yielded); with a lookahead decoder the next step is queued
    on the device before that read, so the device computes while the caller handles the token.
    """
    if not prompt_ids:
        raise TinychatError("the prompt is empty; give some text")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, stats.prefilled_tokens = prefill(model, cache, prompt_ids)
        decoder = decoder if decoder is not None else EagerDecoder()
        bound = decoder.bind(model, cache, sampler, processors) if max_tokens > 1 and cache.room > 0 else None
        if bound is None:
            decoder = EagerDecoder()
            bound = decoder.bind(model, cache, sampler, processors)
        step, sample = bound
        # queue step n+1 before reading token n where a device computes while the host works (a GPU); processors
        # need each token's id before the next step
        ahead = decoder.lookahead and model.device.type == "cuda" and not processors
        history = torch.tensor([prompt_ids], device=model.device) if processors else None
        host = torch.empty(1, dtype=torch.long, pin_memory=model.device.type == "cuda") if ahead else None
        for n in range(max_tokens):
            for process in processors:
                logits = process(history, logits)
            token = sample(logits)
            more = n + 1 < max_tokens and cache.room > 0
            read = start_read(token, host) if more and ahead else None  # copy out before the step reuses buffers
            queued = step(token, cache.offset) if read is not None else None  # written past the offset until kept
            token_id = read() if read is not None else int(token[0])  # the one host sync per token
            if n == 0:
                stats.prefill_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
            stats.generated_tokens = n + 1
            stats.decode_seconds = time.perf_counter() - t0
            yield token_id
            if not more:
                return
            if processors:
                history = torch.cat([history, token.view(1, 1)], dim=1)
            logits = queued if queued is not None else step(token, cache.offset)
            cache.append(token_id)


def start_read(token: torch.Tensor, host: torch.Tensor) -> Callable[[], int]:
    """Start copying token [1] to the host; the returned function waits for that copy only (an event after
    it), not for work queued later, so the device computes the next step while the host handles this token."""
    if not token.is_cuda:
        return lambda: int(token[0])
    host.copy_(token.view(1), non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> int:
        done.synchronize()
        return int(host[0])
    return read


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        for stop in self.stops:
            i = self.pending.find(stop)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyText:
    """Sampled token ids -> text deltas, ending at an end-of-sequence token or a stop string: the text side of
    one reply, shared by stream_generate and the server's batch scheduler."""

    def __init__(self, tokenizer: Tokenizer, eos_ids, stop_strings: list[str] = ()):
        self.detok = StreamingDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(list(stop_strings))
        self.eos = set(eos_ids)

    def add(self, token: int) -> tuple[str, bool]:
        """The text this token adds (held back while it could still begin a stop string), and whether the
        reply ends here ("stop": an end-of-sequence token, whose text is not shown, or a stop string)."""
        if token in self.eos:
            return self.matcher.feed(self.detok.finalize())[0] + self.matcher.flush(), True
        return self.matcher.feed(self.detok.add_token(token))

    def finish(self) -> tuple[str, bool]:
        """The reply ended for another reason (max tokens, full context): the text held back, and whether a
        stop string turned up in it after all."""
        text, stopped = self.matcher.feed(self.detok.finalize())
        return text + ("" if stopped else self.matcher.flush()), stopped


def eos_ids(model, tokenizer: Tokenizer) -> set[int]:
    return set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)


def stream_generate(model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                    cache: KVCache | None = None, stop_strings: list[str] = (),
                    decoder=None, processors: list[Callable] = ()) -> Iterator[GenerationResponse]:
    """Yield text deltas as tokens arrive; the last response carries the finish reason and final stats.

    processors: extra logits processors for this generation (e.g. tinychat.grammar's JSON constraint), run
    after the ones `params` asks for."""
    params.validate()
    cache = cache if cache is not None else model.make_cache()
    stats = GenerationStats()
    reply = ReplyText(tokenizer, eos_ids(model, tokenizer), stop_strings)
    steps = generate_step(model, prompt_ids, cache, make_sampler(params),
                          make_logits_processors(params) + list(processors), params.max_tokens, stats, decoder)
    for token in steps:
        text, stopped = reply.add(token)
        if stopped:
            steps.close()
            yield GenerationResponse(text, token, "stop", stats)
            return
        yield GenerationResponse(text, token, None, stats)
    text, stopped = reply.finish()
    yield GenerationResponse(text, None, "stop" if stopped else "length", stats)
