"""Continuous batching: one thread owns the model and decodes every running request together.

The KV cache has `slots` rows (its batch dimension), each `max_seq` positions long. Running requests sit
in rows 0..n-1, so each decode step is one `model.decode_step` over the contiguous first n rows, every row
at its own position, with its own sampler, logits processors and stop strings (the step of each batch size
is captured on first use and replayed, as single-stream decoding's is). Rows n.. keep the keys and
values of finished requests: that is the prefix cache. A new request takes the idle row whose tokens share
the longest prefix with its prompt (the least recently used row when none does), swaps it into row n,
prefills only the tokens after the shared prefix, samples its first token and joins the next step. A
finished or cancelled request swaps places with the last running row and leaves; its row stays cached.

Prefill and decode take turns: each turn prefills at most `prefill_chunk` prompt tokens (whole prompts
while they fit, those waiting together in one forward, else one chunk of a long one, which goes on at the
next turn in the row after the running ones), then runs one decode step. A long prompt arriving while
others decode so delays their next token by one chunk's prefill, not by its whole prompt's.

Callers (the server, benchmarks, tests) `submit` a Job and receive its events through `job.emit`, called on
the scheduler's thread (`run` on the caller's, or `start` for a background one): one TokenEvent per
sampled token, then one DoneEvent.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import CacheRows
from .cpu_graph import Uncapturable
from .cuda_graph import step_class
from .errors import TinychatError
from .generate import PREFILL_CHUNK, ReplyText, eos_ids
from .sampling import SamplingParams, greedy, make_logits_processors, make_sampler
from .static_step import CapturedStep


class QueueFull(TinychatError):
    """More requests are waiting than the queue holds."""


@dataclass
class TokenEvent:
    text: str  # new text (may be empty while bytes or a possible stop string are held back)
    token: int
    logprob: float | None = None  # of the sampled token under the model's distribution, with top_logprobs
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    error: str | None = None
    time_to_first_token: float = 0.0  # seconds from submit to the first token
    decode_seconds: float = 0.0  # from the first token to the last


@dataclass
class Job:
    """One request. `processors` run after the sampling parameters' own (e.g. a grammar constraint);
    `logprobs` None returns none, k >= 0 the sampled token's log-probability and the k most likely."""
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    stop: list[str] = field(default_factory=list)
    processors: list[Callable] = field(default_factory=list)
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (within one decode step); a DoneEvent("cancelled") follows."""
        self.cancelled.set()


@dataclass
class _Prefill:
    """A job whose prompt is being prefilled, a chunk per turn, in the row after the running ones."""
    job: Job
    cached: int  # prompt tokens its row held from the prefix cache


class _Running:
    """A job in its row: the sampler and processors of its parameters, and the text and token counts so far."""

    def __init__(self, job: Job, reply: ReplyText, cached: int):
        self.job = job
        self.sampler = make_sampler(job.params)
        self.processors = make_logits_processors(job.params) + list(job.processors)
        self.greedy = self.sampler is greedy and not self.processors  # its token: the argmax of its logits
        self.reply = reply
        self.history = list(job.prompt_ids)  # prompt + sampled tokens, for the processors
        self.generated = 0
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.cached = cached
        self.first_token_at: float | None = None

    def done(self, reason: str, error: str | None = None) -> DoneEvent:
        now = time.perf_counter()
        first = self.first_token_at
        return DoneEvent(reason, len(self.job.prompt_ids), self.generated, self.cached, error,
                         (first or now) - self.job.submitted, now - first if first is not None else 0.0)


class BatchScheduler:
    """Runs jobs on `model` in a background thread; at most `slots` decode together, `max_queue` wait."""

    def __init__(self, model, tokenizer, slots: int = 8, max_seq: int | None = None, max_queue: int = 64,
                 capture: bool = True, prefill_chunk: int = PREFILL_CHUNK):
        """capture: replay each batch size's decode step captured (tinychat.cuda_graph.step_class: a CUDA
        graph, or the CPU's recorded kernel calls) where the model allows; False: always eager.
        prefill_chunk: prompt tokens prefilled between two decode steps."""
        if slots < 1:
            raise TinychatError(f"--slots must be at least 1, got {slots}")
        if max_queue < 0:
            raise TinychatError(f"--max-queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise TinychatError(f"--prefill-chunk must be at least 1 token, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.cache = model.make_cache(max_seq, batch=slots)
        self.slots, self.max_queue, self.prefill_chunk = slots, max_queue, prefill_chunk
        self.row_tokens: list[list[int]] = [[] for _ in range(slots)]  # tokens whose keys/values each row holds
        self.row_used = [0] * slots  # when each row last served a request (least recently used goes first)
        self._clock = 0
        self.running: list[_Running] = []  # running[i] lives in row i
        self._prefilling: _Prefill | None = None  # a prompt begun, in row len(self.running)
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._views: dict[tuple[int, int], CacheRows] = {}
        self.capture = capture
        self._captured: dict[int, CapturedStep | None] = {}  # batch size -> its captured step (None: eager)
        self._thread: threading.Thread | None = None

    def start(self) -> BatchScheduler:
        """Run the loop on a background thread (tests, benchmarks); `run` is the other way."""
        self._thread = threading.Thread(target=self.run, name="tinychat-batch", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until `close`. The server calls it on the thread that loaded
        the model: torch's OpenMP keeps one team of worker threads per calling thread, and a second team
        on a machine with few cores stops libgomp's workers from spinning between the many small parallel
        regions of a decode step (measured: one stream decoded at half speed from a second thread)."""
        self._loop()

    @property
    def max_seq(self) -> int:
        return self.cache.max_seq

    @property
    def captured_sizes(self) -> list[int]:
        """The batch sizes whose decode step replays a capture."""
        return sorted(n for n, step in self._captured.items() if step is not None)

    @property
    def active(self) -> int:
        """Requests decoding or being prefilled."""
        return len(self.running) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return sum(not job.cancelled.is_set() for job in self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when `max_queue` jobs already wait for a free slot."""
        if len(job.prompt_ids) > self.max_seq:
            raise TinychatError(f"the prompt has {len(job.prompt_ids)} tokens but the context holds "
                                f"{self.max_seq}; shorten it or raise --max-context")
        with self._wake:
            if self._closed:
                raise TinychatError("the scheduler is closed")
            waiting = self.waiting
            if waiting >= self.max_queue + max(0, self.slots - self.active):
                raise QueueFull(f"{waiting} requests are waiting for a slot (--max-queue {self.max_queue}); "
                                "retry shortly")
            self._pending.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._pending or self.active or self._closed):
                        self._wake.wait(timeout=0.5)
                    if self._closed:
                        break
                    gone = [job for job in self._pending if job.cancelled.is_set()]  # left before their turn
                    self._pending = collections.deque(job for job in self._pending if not job.cancelled.is_set())
                for job in gone:
                    job.emit(DoneEvent("cancelled", len(job.prompt_ids)))
                self._prefill()
                if self.running:
                    self._step_all()
        begun = [self._prefilling.job] if self._prefilling is not None else []
        for job in [r.job for r in self.running] + begun + list(self._pending):
            job.emit(DoneEvent("cancelled", len(job.prompt_ids)))

    def _prefill(self) -> None:
        """This turn's prefill, at most prefill_chunk tokens: the rest of a long prompt begun earlier, then
        waiting jobs' whole prompts (together, _prefill_together) while they fit, else the first chunk of
        the next one."""
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None:
                taken = self._prefill_together(budget)
                if taken:
                    budget -= taken
                    continue
                with self._wake:
                    if not self._pending or len(self.running) >= self.slots:
                        return
                    job = self._pending.popleft()
                self._prefilling = self._begin(job, len(self.running))
            budget -= self._prefill_part(budget)

    def _begin(self, job: Job, row: int) -> _Prefill:
        """Give a job `row` (a free one, after the running ones) holding the longest cached prefix of its
        prompt."""
        common = self._claim_row(job.prompt_ids, row)
        self._clock += 1
        self.row_used[row] = self._clock
        return _Prefill(job, common)

    def _prefill_together(self, budget: int) -> int:
        """Prefill the whole prompts of the next waiting jobs, as many as fit the budget and the free rows,
        in one forward (padded to the longest: _fits), each in its row after the running ones; then each
        samples its first token and joins. Prompts that arrive together (concurrent clients) so share each
        pass over the weights: 8 prompts of ~60 tokens took 14% less time than one after another (2-core
        CPU). Returns the tokens computed, padding included; 0 when the next job's prompt does not fit
        whole (it is prefilled a chunk per turn)."""
        n = len(self.running)
        batch: list[tuple[Job, int]] = []  # (job, the prompt tokens its row holds from the prefix cache)
        while n + len(batch) < self.slots:
            with self._wake:
                if not self._pending:
                    break
                job = self._pending[0]
                cancelled = job.cancelled.is_set()
                if not cancelled and not self._fits(job, batch, min(budget, PREFILL_CHUNK)):
                    break
                self._pending.popleft()
            if cancelled:
                job.emit(DoneEvent("cancelled", len(job.prompt_ids)))
                continue
            batch.append((job, self._begin(job, n + len(batch)).cached))
        if not batch:
            return 0
        chunks = [job.prompt_ids[cached:] for job, cached in batch]
        computed = len(batch) * max(map(len, chunks))
        try:
            logits = self._forward(n, chunks, [cached for _, cached in batch])
        except Exception as e:  # noqa: BLE001 - a server must outlive one failed request
            for i, (job, _) in enumerate(batch):
                self._fail(job, n + i, e)
            return computed
        for i, chunk in enumerate(chunks):
            self.row_tokens[n + i].extend(chunk)
        for i, (job, cached) in enumerate(batch):  # job i is in row n + i until its turn here
            self._join(job, n + i, cached, logits[i:i + 1])
        return computed

    def _fits(self, job: Job, batch: list[tuple[Job, int]], limit: int) -> bool:
        """Whether job's prompt joins `batch` in one forward: at most `limit` tokens padded, at most a quarter
        of them padding, every row's padded positions inside the context, and no long prefix shared with a
        prompt of the batch beyond what the cache holds (prefilled after it, the job copies that prefix)."""
        limit_prefix = len(job.prompt_ids) - 1
        cached = max(common_prefix(tokens, job.prompt_ids, limit_prefix) for tokens in self.row_tokens)
        rest = len(job.prompt_ids) - cached
        rests = [len(other.prompt_ids) - start for other, start in batch] + [rest]
        width = max(rests)
        padded = width * len(rests)
        if padded > limit or 4 * (padded - sum(rests)) > padded:
            return False
        if max([start for _, start in batch] + [cached]) + width > self.max_seq:
            return False
        return all(common_prefix(other.prompt_ids, job.prompt_ids, limit_prefix) - cached <= rest // 4
                   for other, _ in batch)

    def _prefill_part(self, budget: int) -> int:
        """Prefill the next (at most budget) tokens of the prompt begun; at its end sample its first token and
        let it join the running rows. Returns the tokens it took."""
        state, n = self._prefilling, len(self.running)
        job, tokens = state.job, self.row_tokens[n]
        if job.cancelled.is_set():  # the keys and values computed so far stay cached in the row
            self._prefilling = None
            job.emit(DoneEvent("cancelled", len(job.prompt_ids), cached_tokens=state.cached))
            return 0
        chunk = job.prompt_ids[len(tokens):len(tokens) + min(budget, PREFILL_CHUNK)]
        try:
            logits = self._forward(n, [chunk], [len(tokens)])
        except Exception as e:  # noqa: BLE001 - a server must outlive one failed request
            self._prefilling = None
            self._fail(job, n, e)
            return len(chunk)
        tokens.extend(chunk)
        if len(tokens) == len(job.prompt_ids):
            self._prefilling = None
            self._join(job, n, state.cached, logits)
        return len(chunk)

    def _forward(self, n: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prompt tokens chunks[i] into row n + i from position starts[i], in one forward padded to the longest
        chunk: the logits [len(chunks), vocab] after each chunk's last token."""
        device, width = self.model.device, max(map(len, chunks))
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        positions = torch.tensor(starts, dtype=torch.long).unsqueeze(1) + torch.arange(width)
        last = torch.tensor([len(chunk) - 1 for chunk in chunks], dtype=torch.long, device=device)
        return self.model.run(ids.to(device), positions.to(device), self._rows(n, n + len(chunks)),
                              last_only=True, last=last)[:, 0]

    def _fail(self, job: Job, row: int, e: Exception) -> None:
        self.row_tokens[row] = []  # the row may hold half-written keys/values: forget them
        job.emit(DoneEvent("error", len(job.prompt_ids), error=_failure(e)))

    def _join(self, job: Job, row: int, cached: int, logits: torch.Tensor) -> None:
        """Sample the first token of a job whose prompt `row` holds; unless that ends it, it joins the running
        rows (its row moving up past the rows of jobs prefilled with it that ended at once)."""
        target = len(self.running)
        self._swap_rows(row, target)
        running = _Running(job, ReplyText(self.tokenizer, self.eos, job.stop), cached)
        if self._sample(running, target, logits) is None:
            self.running.append(running)
        _yield_cpu()

    def _step_all(self) -> None:
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - fail this batch, keep serving
            for row, running in enumerate(self.running):
                running.job.emit(running.done("error", _failure(e)))
                self.row_tokens[row] = []
            if self._prefilling is not None:  # its row follows the running ones
                self._swap_rows(len(self.running), 0)
            self.running = []

    def _step(self) -> None:
        """One decode step for every running row, after letting cancelled jobs go."""
        for row in reversed(range(len(self.running))):
            running = self.running[row]
            if running.job.cancelled.is_set():
                running.job.emit(running.done("cancelled"))
                self._retire(row)
        n = len(self.running)
        if n == 0:
            return
        device = self.model.device
        tokens = torch.tensor([r.next_token for r in self.running], dtype=torch.long, device=device)
        positions = torch.tensor([len(self.row_tokens[row]) for row in range(n)], dtype=torch.long, device=device)
        logits = self._decode(tokens, positions, n)
        for row, running in enumerate(self.running):
            self.row_tokens[row].append(running.next_token)
        # the greedy rows' tokens from one argmax over the batch (8 calls of ~30 us each were 3% of a step)
        picks = greedy(logits).tolist() if sum(r.greedy for r in self.running) > 1 else [None] * n
        finished = [row for row, running in enumerate(self.running)
                    if self._sample(running, row, logits[row:row + 1], picks[row] if running.greedy else None)
                    is not None]
        for row in reversed(finished):
            self._retire(row)
        if finished:
            _yield_cpu()

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
        """The decode step of rows 0..n-1: replayed when this batch size's step was captured, captured on its
        first use (at this very step: the capture writes the keys and values the step writes)."""
        rows = self._rows(0, n)
        if self.capture and n not in self._captured:
            self._captured[n] = None
            kind = step_class(self.model, rows)
            if kind is not None:
                try:
                    self._captured[n] = kind(self.model, rows, positions, tokens)
                except Uncapturable:
                    self.capture = False  # torch computes part of this model's step: so for every size
                except Exception as e:  # noqa: BLE001 - never let the fast path break serving
                    warnings.warn(f"tinychat: capturing the batch-{n} decode step failed ({type(e).__name__}: "
                                  f"{e}); decoding it eagerly", RuntimeWarning, stacklevel=2)
        captured = self._captured.get(n)
        if captured is None:
            return self.model.decode_step(tokens, positions, rows)
        return captured.replay(tokens, positions)

    def _sample(self, running: _Running, row: int, logits: torch.Tensor, picked: int | None = None) -> str | None:
        """Sample the next token of a running job from its logits [1, vocab] (or take `picked`, its greedy
        token already chosen), send it, and end the job (returning why) when it is finished."""
        job = running.job
        raw = logits
        try:
            if running.processors:
                history = torch.tensor([running.history], dtype=torch.long, device=logits.device)
                for process in running.processors:
                    logits = process(history, logits)
            token = picked if picked is not None else int(running.sampler(logits)[0])
        except Exception as e:  # noqa: BLE001 - e.g. a grammar that rejects; only this job fails
            job.emit(running.done("error", _failure(e)))
            return "error"
        if running.first_token_at is None:
            running.first_token_at = time.perf_counter()
        running.generated += 1
        running.history.append(token)
        running.next_token = token
        text, stopped = running.reply.add(token)
        reason = "stop" if stopped else None
        room = len(self.row_tokens[row]) < self.max_seq  # the next step writes this token's keys there
        if reason is None and (running.generated >= job.params.max_tokens or not room):
            held, stopped = running.reply.finish()
            text += held
            reason = "stop" if stopped else "length"
        job.emit(TokenEvent(text, token, *self._logprobs(raw, token, job.logprobs)))
        if reason is not None:
            job.emit(running.done(reason))
        return reason

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, k: int | None) -> tuple:
        """The model's own log-probabilities (before temperature and processors), as OpenAI reports them."""
        if k is None:
            return None, None
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(logprobs, k) if k > 0 else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return float(logprobs[token]), pairs

    # -- rows ----------------------------------------------------------------------------------------------

    def _rows(self, start: int, stop: int) -> CacheRows:
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = CacheRows(self.cache, start, stop)
        return view

    def _claim_row(self, prompt: list[int], n: int) -> int:
        """Make row n (the first idle one) hold the longest cached prefix of the prompt and return its length.

        An idle row that mostly holds this prompt's own beginning (the previous turn of this conversation, or
        the same prompt again) is taken as it is, its other tokens forgotten. Otherwise an empty row, else the
        least recently used idle row, is overwritten, and the longest prefix any row shares with the prompt
        (a running row included: concurrent requests with one system prompt) is copied into it, so another
        conversation's cache is not cut short for a shared preamble. The prompt's last token is always left
        to prefill, since its logits give the first token."""
        limit = len(prompt) - 1
        shared = [common_prefix(tokens, prompt, limit) for tokens in self.row_tokens]
        idle = range(n, self.slots)
        extended = [row for row in idle if shared[row] > 0 and 2 * shared[row] >= len(self.row_tokens[row])]
        if extended:
            target = max(extended, key=shared.__getitem__)
        else:
            target = min(idle, key=lambda row: (len(self.row_tokens[row]) > 0, self.row_used[row]))
        donor = max(range(self.slots), key=shared.__getitem__)
        longest = shared[donor]
        del self.row_tokens[target][shared[target]:]  # overwritten from there on: only the rest moves
        self._swap_rows(target, n)
        donor = {n: target, target: n}.get(donor, donor)  # where the donor's tokens are after the swap
        if donor != n and longest > shared[target]:
            self.cache.copy_prefix(donor, n, longest)
            self.row_tokens[n] = self.row_tokens[donor][:longest]
            return longest
        return shared[target]

    def _swap_rows(self, a: int, b: int) -> None:
        if a == b:
            return
        # only the positions each row holds move (a new request takes an empty row's place, usually, and the
        # finished conversation there moves out)
        self.cache.swap_prefixes(a, len(self.row_tokens[a]), b, len(self.row_tokens[b]))
        self.row_tokens[a], self.row_tokens[b] = self.row_tokens[b], self.row_tokens[a]
        self.row_used[a], self.row_used[b] = self.row_used[b], self.row_used[a]

    def _retire(self, row: int) -> None:
        """Take a finished job out of the batch: the last running row moves into its place."""
        last = len(self.running) - 1
        self._swap_rows(row, last)
        self.running[row] = self.running[last]
        self.running.pop()
        if self._prefilling is not None:  # its row follows the running ones
            self._swap_rows(last + 1, last)


# Gives this core up for a moment after events a client waits on (a first token, an end): the thread they
# wake (the server's event loop) runs now instead of after the next decode step. Traced through the server
# (2-core Zen 4 VM): the first token reached the client 1.4 ms after it was sampled, 0.4 ms with this; it
# costs the batch a few hundred microseconds once per request.
_yield_cpu = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def _failure(e: Exception) -> str:
    return str(e) if isinstance(e, TinychatError) else f"generation failed: {type(e).__name__}: {e}"


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    limit = min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n
