"""BatchScheduler in process, with the default model in fp32 (see test_server.py for why fp32): batched
requests equal the same requests run alone, the prefix cache, least-recently-used eviction, cancellation,
a full context, a failing processor and a full queue."""

import queue
import threading

import pytest
import torch

from tinychat.batching import BatchScheduler, DoneEvent, Job, QueueFull, TokenEvent
from tinychat.generate import stream_generate
from tinychat.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Who wrote Hamlet?", "Name a color."]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from tinychat.engine import load_engine
    from tinychat.hub import DEFAULT_MODEL

    return load_engine(DEFAULT_MODEL, "fp32", quiet=True)


@pytest.fixture
def scheduler(engine):
    s = BatchScheduler(engine.model, engine.tokenizer, slots=3, max_seq=256, max_queue=2).start()
    yield s
    s.close()


def greedy(n=12, **kw):
    return SamplingParams(temperature=0, max_tokens=n, **kw)


def chat_ids(engine, text, system="You are brief."):
    return engine.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": text}])


class Collector:
    """A job's events, gathered from the scheduler thread."""

    def __init__(self):
        self.events = queue.Queue()

    def __call__(self, event):
        self.events.put(event)

    def result(self, timeout=120) -> tuple[list[int], str, DoneEvent]:
        tokens, text = [], []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, DoneEvent):
                return tokens, "".join(text), event
            tokens.append(event.token)
            text.append(event.text)


def submit(scheduler, ids, params, **kw) -> Collector:
    collector = Collector()
    scheduler.submit(Job(ids, params, collector, **kw))
    return collector


def alone(engine, ids, params) -> str:
    return "".join(r.text for r in stream_generate(engine.model, engine.tokenizer, ids, params))


def test_batched_requests_equal_each_alone(engine, scheduler):
    prompts = [chat_ids(engine, q, system=f"You are brief. Request {i}.") for i, q in enumerate(QUESTIONS)]
    runs = [submit(scheduler, ids, greedy()) for ids in prompts]  # 5 jobs, 3 slots: two wait, then join
    results = [run.result() for run in runs]
    for ids, (tokens, text, done) in zip(prompts, results):
        assert text == alone(engine, ids, greedy())
        assert done.finish_reason in ("stop", "length") and done.completion_tokens == len(tokens)
        assert done.prompt_tokens == len(ids)
    assert not scheduler.running


@pytest.fixture
def prefill_shapes(engine, monkeypatch):
    """The [batch, tokens] of every prompt forward (more than one token a row) the model runs."""
    shapes, run = [], engine.model.run

    def spy(ids, positions, *args, **kwargs):
        if ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))
        return run(ids, positions, *args, **kwargs)
    monkeypatch.setattr(engine.model, "run", spy)
    return shapes


def waiting_together(engine, prompts, params) -> list[tuple]:
    """Submit every prompt before the scheduler starts (as concurrent clients' requests wait for a turn)."""
    s = BatchScheduler(engine.model, engine.tokenizer, slots=4, max_seq=256)
    runs = [submit(s, ids, params) for ids in prompts]
    s.start()
    try:
        return [run.result() for run in runs]
    finally:
        s.close()


def test_prompts_waiting_together_are_prefilled_in_one_forward(engine, prefill_shapes):
    """Three prompts of different lengths waiting together: one forward padded to the longest, each row's
    first token from its own last prompt token; each text equals the prompt's alone."""
    prompts = [chat_ids(engine, q, system=f"Request {i}.") for i, q in enumerate(QUESTIONS[:3])]
    assert len(set(map(len, prompts))) > 1
    results = waiting_together(engine, prompts, greedy())
    assert prefill_shapes == [(3, max(map(len, prompts)))]
    for ids, (_, text, done) in zip(prompts, results):
        assert text == alone(engine, ids, greedy()) and done.cached_tokens == 0


def test_prompts_that_would_pad_much_or_share_a_prefix_are_prefilled_apart(engine, prefill_shapes):
    """A prompt twice as long as another would make half the forward padding: two forwards. A prompt that
    shares a long prefix with one in the batch waits for it and copies that prefix from its row."""
    short = chat_ids(engine, QUESTIONS[3], system="Brief.")
    long = chat_ids(engine, QUESTIONS[1], system="You are a poet. " * 12)
    assert len(long) > 2 * len(short)
    _, (_, _, done) = waiting_together(engine, [short, long], greedy(2))
    assert done.cached_tokens < 5  # the template's first tokens, from the short prompt's row
    assert prefill_shapes == [(1, len(short)), (1, len(long) - done.cached_tokens)]

    prefill_shapes.clear()
    system = "You are a careful assistant who answers questions about geography, history and science."
    first, second = (chat_ids(engine, q, system=system) for q in QUESTIONS[:2])
    (_, text, _), (_, _, done) = waiting_together(engine, [first, second], greedy(4))
    assert done.cached_tokens >= 15
    assert prefill_shapes == [(1, len(first)), (1, len(second) - done.cached_tokens)]
    assert text == alone(engine, first, greedy(4))


def test_prefix_cache_reuses_a_finished_conversation(engine, scheduler):
    ids = chat_ids(engine, QUESTIONS[0])
    first_tokens, first_text, first = submit(scheduler, ids, greedy(8)).result()
    assert first.cached_tokens == 0
    follow = engine.encode_chat([{"role": "system", "content": "You are brief."},
                                 {"role": "user", "content": QUESTIONS[0]},
                                 {"role": "assistant", "content": first_text},
                                 {"role": "user", "content": "Why?"}])
    _, text, second = submit(scheduler, follow, greedy(8)).result()
    assert second.cached_tokens >= len(ids) and second.cached_tokens < len(follow)
    assert text == alone(engine, follow, greedy(8))  # fp32: cached prefix + the rest equals a whole prefill


def test_least_recently_used_row_is_evicted(engine, scheduler):
    prompts = [chat_ids(engine, q, system=f"System {i}.") for i, q in enumerate(QUESTIONS[:4])]
    for ids in prompts[:3]:  # fill the 3 rows, oldest first
        submit(scheduler, ids, greedy(2)).result()
    submit(scheduler, prompts[0], greedy(2)).result()  # row of prompt 0 becomes the most recent
    submit(scheduler, prompts[3], greedy(2)).result()  # evicts prompt 1's row, the least recently used
    assert submit(scheduler, prompts[0], greedy(2)).result()[2].cached_tokens == len(prompts[0]) - 1
    assert submit(scheduler, prompts[2], greedy(2)).result()[2].cached_tokens == len(prompts[2]) - 1
    assert submit(scheduler, prompts[1], greedy(2)).result()[2].cached_tokens < len(prompts[1]) - 1


def test_running_rows_share_their_prefix_with_a_new_request(engine, scheduler):
    slow = submit(scheduler, chat_ids(engine, "Write a long story about a dragon."), greedy(60))
    first = slow.events.get(timeout=60)  # the first job is decoding
    assert isinstance(first, TokenEvent)
    _, _, done = submit(scheduler, chat_ids(engine, QUESTIONS[3]), greedy(4)).result()
    assert done.cached_tokens > 5  # the shared system prompt came from the running row
    slow.result()


def test_a_long_prompt_is_prefilled_a_chunk_per_decode_step(engine):
    """prefill_chunk 8: a prompt arriving while another request decodes is prefilled 8 tokens a turn, each turn
    followed by a decode step, so the running request's tokens keep coming while it is prefilled (all at once,
    they would stop until its first token); both texts equal each request run alone, and a request cancelled
    halfway through its prefill leaves its row's keys and values as a prefix cache for the next."""
    s = BatchScheduler(engine.model, engine.tokenizer, slots=2, max_seq=256, prefill_chunk=8).start()
    log = []  # (request, event), in the order the scheduler emitted them

    def recorded(name):
        collector = Collector()

        def emit(event):
            log.append((name, type(event).__name__))
            collector(event)
        return collector, emit

    story = chat_ids(engine, "Write a long story about a dragon.")
    long = chat_ids(engine, QUESTIONS[1], system="You are a poet. You answer every question with a short poem "
                                                 "about the sea, the wind and the stars.")
    try:
        first, emit = recorded("story")
        s.submit(Job(story, greedy(60), emit))
        while ("story", "TokenEvent") not in log:
            threading.Event().wait(0.01)
        second, emit = recorded("long")
        mark = len(log)
        s.submit(Job(long, greedy(8), emit))
        _, long_text, done = second.result()
        _, story_text, _ = first.result()
        chunks = -(-(len(long) - done.cached_tokens) // 8)
        assert chunks >= 5
        between = log[mark:log.index(("long", "TokenEvent"))]
        assert between.count(("story", "TokenEvent")) >= chunks - 1
        assert long_text == alone(engine, long, greedy(8))
        assert story_text == alone(engine, story, greedy(60))

        gone = Job(chat_ids(engine, QUESTIONS[2], system="Request seven. " * 6), greedy(4), Collector())
        s.submit(Job(story, greedy(40), Collector()))  # decoding: the next prompt is prefilled in turns
        s.submit(gone)
        while s.row_tokens[1][:16] != gone.prompt_ids[:16] and not gone.emit.events.qsize():  # 16 prefilled
            threading.Event().wait(0.001)
        gone.cancel()
        assert gone.emit.result()[2].finish_reason in ("cancelled", "length", "stop")
        _, _, again = submit(s, gone.prompt_ids, greedy(2)).result()
        assert again.cached_tokens >= 16
    finally:
        s.close()


def test_cancel_ends_a_job_within_a_step_and_frees_its_row(engine, scheduler):
    long = Collector()
    job = Job(chat_ids(engine, "Write a long story about a dragon."), greedy(200), long)
    scheduler.submit(job)
    assert isinstance(long.events.get(timeout=60), TokenEvent)
    job.cancel()
    tokens, _, done = long.result()
    assert done.finish_reason == "cancelled" and len(tokens) < 20
    assert not scheduler.running
    assert submit(scheduler, chat_ids(engine, QUESTIONS[0]), greedy(3)).result()[2].finish_reason == "length"


def test_full_context_ends_with_length(engine):
    ids = chat_ids(engine, QUESTIONS[1])
    s = BatchScheduler(engine.model, engine.tokenizer, slots=1, max_seq=len(ids) + 3).start()
    try:
        tokens, _, done = submit(s, ids, greedy(50)).result()
    finally:
        s.close()
    assert done.finish_reason == "length" and len(tokens) == 4  # 3 positions left + the last sampled token


def test_a_failing_processor_fails_only_its_job(engine, scheduler):
    calls = []

    def broken(history, logits):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("broken processor")
        return logits

    ok = submit(scheduler, chat_ids(engine, QUESTIONS[0]), greedy(10))
    bad = submit(scheduler, chat_ids(engine, QUESTIONS[1]), greedy(10), processors=[broken])
    _, _, failed = bad.result()
    assert failed.finish_reason == "error" and "broken processor" in failed.error
    assert ok.result()[2].finish_reason in ("stop", "length")


def test_full_queue_raises(engine):
    s = BatchScheduler(engine.model, engine.tokenizer, slots=1, max_seq=256, max_queue=1).start()
    gate = threading.Event()

    def slow_processor(history, logits):
        gate.wait(30)
        return logits

    try:
        running = submit(s, chat_ids(engine, QUESTIONS[0]), greedy(3), processors=[slow_processor])
        while not s.running and running.events.empty():
            threading.Event().wait(0.01)
        waiting = submit(s, chat_ids(engine, QUESTIONS[1]), greedy(3))
        with pytest.raises(QueueFull):
            submit(s, chat_ids(engine, QUESTIONS[2]), greedy(3))
        gate.set()
        assert running.result()[2].finish_reason in ("stop", "length")
        assert waiting.result()[2].finish_reason in ("stop", "length")
    finally:
        gate.set()
        s.close()


def test_logprobs_are_the_models_distribution(engine, scheduler):
    ids = chat_ids(engine, QUESTIONS[0])
    collector = submit(scheduler, ids, greedy(1), logprobs=3)
    event = collector.events.get(timeout=60)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids]), last_only=True)[0, -1]
    want = torch.log_softmax(logits.float(), -1)
    assert event.logprob == pytest.approx(float(want.max()), abs=1e-4)
    assert [t for t, _ in event.top_logprobs] == torch.topk(want, 3).indices.tolist()


def test_int4_bf16_batch_rows_equal_rows_alone(default_model_dir):
    """The CPU's 4-bit bf16 path: a row's decode step in a batch is bit-identical to the row alone (the
    int4 GEMV, the int8 head and the attention compute each row as they would alone), so greedy text
    matches exactly when the prompts share no prefix (a prefix copied from the cache is the one thing
    that changes bf16 rounding: its keys were computed in another prefill)."""
    from tinychat.engine import load_engine
    from tinychat.hub import DEFAULT_MODEL

    engine = load_engine(DEFAULT_MODEL, quiet=True)  # w4a16, bf16 on the CPU
    prompts = [engine.tokenizer.encode(text, add_special_tokens=False) for text in
               ("Once upon a time", "The capital of France", "In 1492, Columbus", "def fibonacci(n):")]
    assert len({ids[0] for ids in prompts}) == len(prompts)
    s = BatchScheduler(engine.model, engine.tokenizer, slots=4, max_seq=128).start()
    try:
        runs = [submit(s, ids, greedy(24)) for ids in prompts]
        texts = [run.result()[1] for run in runs]
    finally:
        s.close()
    assert texts == [alone(engine, ids, greedy(24)) for ids in prompts]


def test_captured_batched_steps_equal_eager_ones_on_the_4bit_bf16_model(default_model_dir):
    """The CPU engine's own model (w4a16: bf16, int4 linears, int8 head) records each batch size's decode step
    and replays it (tinychat.cpu_graph): the same tokens as the eager steps, request by request, while
    requests join and leave (5 jobs on 3 slots: batch sizes 3, 2, 1)."""
    from tinychat.engine import load_engine
    from tinychat.hub import DEFAULT_MODEL

    engine = load_engine(DEFAULT_MODEL, "w4a16", quiet=True)
    prompts = [chat_ids(engine, q, system=f"Request {i}.") for i, q in enumerate(QUESTIONS)]
    results = {}
    for capture in (True, False):
        s = BatchScheduler(engine.model, engine.tokenizer, slots=3, max_seq=256, capture=capture).start()
        try:
            runs = [submit(s, ids, greedy(10 + 3 * i)) for i, ids in enumerate(prompts)]
            results[capture] = [run.result()[0] for run in runs]
            if capture:
                assert 3 in s.captured_sizes and len(s.captured_sizes) >= 2
            else:
                assert s.captured_sizes == []
        finally:
            s.close()
    assert results[True] == results[False]
