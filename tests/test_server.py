"""`tinychat serve` as a user meets it: a real server process on a free localhost port, driven by the official
`openai` client (and raw HTTP for malformed requests), with the default model.

The server runs the model in fp32 so that greedy text is a fair reference across batch sizes: a request
decoded among seven others, or prefilled after a prefix another request left in the cache, sums the same
products in another order, which moves fp32 logits by ~1e-6 (bf16 ones by up to ~0.3, enough to flip a
near-tie). The int4 bf16 path's batch rows are checked bit-exact in test_cpu_kernels.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 2+2?", "Name a color.",
             "Say hello in Spanish."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinychat", "serve", "--port", str(self.port), "--precision", "fp32", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not come up in 120 s")

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(default_model_dir):
    s = Server("--slots", "8", "--max-queue", "8", "--max-context", "1024")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model_id(server):
    return server.client().models.list().data[0].id


def ask(client, model_id, question, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}],
                                          **kwargs)


# ---------------------------------------------------------------------------------------------- basics


def test_models_and_health(server, model_id):
    assert model_id == "smollm2-135m-instruct"
    assert server.health()["status"] == "ok"


def test_chat_non_streaming(server, model_id):
    r = ask(server.client(), model_id, QUESTIONS[0], max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(server, model_id):
    client = server.client()
    response = ask(client, model_id, QUESTIONS[3], max_tokens=12)
    whole = response.choices[0]
    chunks = list(ask(client, model_id, QUESTIONS[3], max_tokens=12, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_a_paced_stream_carries_every_token_in_order(server, model_id):
    """The default --stream-interval (50 ms) holds tokens between chunks: every token still comes, in order,
    with its logprob (how many to a chunk depends on this machine's speed; tests/test_stream_relay.py holds
    the pacing itself to its rules)."""
    client = server.client()
    whole = ask(client, model_id, QUESTIONS[4], max_tokens=24, logprobs=True)
    chunks = [c for c in ask(client, model_id, QUESTIONS[4], max_tokens=24, logprobs=True, stream=True)
              if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    streamed = [e.token for c in chunks for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in whole.choices[0].logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_stream_ends_with_done(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    lines = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: {") for line in lines[:-1])


def test_completions_with_stop_and_logprobs(server, model_id):
    client = server.client()
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, logprobs=2)
    choice = r.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.tokens) == r.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    cut = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8,
                                    temperature=0, stop=["."])
    assert cut.choices[0].finish_reason == "stop" and "." not in cut.choices[0].text


def test_chat_logprobs(server, model_id):
    r = ask(server.client(), model_id, QUESTIONS[0], max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy takes the most likely token
        assert entry.token == entry.top_logprobs[0].token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content[:10])


def test_seeded_sampling_is_reproducible(server, model_id):
    client = server.client()
    runs = [ask(client, model_id, QUESTIONS[1], max_tokens=10, temperature=1.0, seed=7).choices[0].message.content
            for _ in range(2)]
    other = ask(client, model_id, QUESTIONS[1], max_tokens=10, temperature=1.0, seed=8).choices[0].message.content
    assert runs[0] == runs[1]
    assert other != runs[0]


# ---------------------------------------------------------------------------------------- prefix cache


def test_second_turn_reports_cached_prompt_tokens(server, model_id):
    client = server.client()
    history = [{"role": "system", "content": "You are terse. Session 41."},
               {"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=model_id, messages=history, max_tokens=10, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model=model_id, messages=history, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything up to the end of the first reply is reused (the template's end-of-turn tokens at most are new)
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 3
    assert cached < second.usage.prompt_tokens


# ------------------------------------------------------------------------------------- structured output


def test_json_schema_reply_validates(server, model_id):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "colors": {"type": "array", "maxItems": 3,
                                                          "items": {"type": "string", "maxLength": 12}}},
              "required": ["name", "age", "colors"], "additionalProperties": False}
    r = server.client().chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0,
        max_tokens=200, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_reply_parses(server, model_id):
    r = ask(server.client(), model_id, "Give me a JSON object about a cat.", max_tokens=120,
            response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# ----------------------------------------------------------------------------------------- concurrency


def test_eight_concurrent_streams_each_get_their_own_text(server, model_id):
    client = server.client()
    alone = [ask(client, model_id, q, max_tokens=20).choices[0].message.content for q in QUESTIONS]
    got: dict[int, str] = {}
    errors = []
    barrier = threading.Barrier(len(QUESTIONS))

    def one(i):
        try:
            barrier.wait()
            stream = ask(server.client(), model_id, QUESTIONS[i], max_tokens=20, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got.get(i) for i in range(len(QUESTIONS))] == alone
    assert server.health()["running"] == 0


def test_disconnect_mid_stream_frees_the_server(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert server.health()["running"] == 1
        closed = time.time()
    while server.health()["running"] and time.time() - closed < 5:
        time.sleep(0.05)
    assert server.health()["running"] == 0
    assert time.time() - closed < 1.0
    assert ask(server.client(), model_id, QUESTIONS[5], max_tokens=4).choices[0].message.content


# ------------------------------------------------------------------------------------------- bad input

LONG = "word " * 1500
BAD_INPUTS = [
    # (what, body (dict, or str for raw bytes), status, param)
    ("malformed JSON", '{"messages": [', 400, None),
    ("body not an object", "[1, 2]", 400, None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("no messages", {}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": LONG}]}, 413, "messages"),
    ("max_tokens < 1", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400,
     "max_tokens"),
    ("temperature < 0", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("n > 1", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("stop wrong type", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    ("schema the grammar engine rejects", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}, 400,
     "response_format"),
    ("unknown response_format", {"messages": [{"role": "user", "content": "hi"}],
                                 "response_format": {"type": "yaml"}}, 400, "response_format"),
]


@pytest.mark.parametrize("what,body,status,param", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_an_openai_error(server, what, body, status, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


def test_completions_bad_prompt(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": {"text": "hi"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_route_is_an_openai_404(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(server, model_id):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        ask(client, model_id, "hi", max_tokens=0)


# ------------------------------------------------------------------------------ API key and a full queue


@pytest.fixture(scope="module")
def small_server(default_model_dir):
    s = Server("--slots", "1", "--max-queue", "1", "--max-context", "512", "--api-key", "sesame",
               "--stream-interval", "0")
    yield s
    s.stop()


def test_api_key_required(small_server):
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").models.list()
    r = httpx.get(small_server.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert small_server.client(api_key="sesame").models.list().data
    assert httpx.get(small_server.url + "/health", timeout=30).status_code == 200  # probes need no key


def test_stream_interval_0_sends_a_chunk_per_token(small_server):
    client = small_server.client(api_key="sesame")
    chunks = [c for c in client.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3,", max_tokens=12,
                                                   temperature=0, logprobs=0, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert len(chunks) == 12 and all(len(c.choices[0].logprobs.tokens) == 1 for c in chunks)


def test_full_queue_answers_429_with_retry_after(small_server):
    headers = {"Authorization": "Bearer sesame"}
    counting = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400, "temperature": 0, "stream": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "stream": True}
    url = small_server.url + "/v1"
    with httpx.Client(timeout=60, headers=headers) as http:
        with http.stream("POST", url + "/completions", json=counting) as running:
            # keep the line iterator: a dropped one is closed at once, and closing it closes the connection
            running_lines = running.iter_lines()
            next(running_lines)  # it holds the only slot
            # a chat stream answers at once (its first chunk names the role) while it waits: the queue is full
            with http.stream("POST", url + "/chat/completions", json=chat) as waiting:
                assert waiting.status_code == 200
                assert small_server.health() == {"status": "ok", "running": 1, "waiting": 1}
                r = http.post(url + "/completions", json=counting)
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
    deadline = time.time() + 5  # both clients went away: their jobs leave the queue and the slot
    while small_server.health() != {"status": "ok", "running": 0, "waiting": 0} and time.time() < deadline:
        time.sleep(0.05)
    assert small_server.health() == {"status": "ok", "running": 0, "waiting": 0}


@pytest.mark.parametrize("flags,message", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--slots", "0"], "--slots must be >= 1"),
    (["--max-queue", "-1"], "--max-queue >= 0"),
    (["--max-context", "0"], "--max-context must be a positive"),
    (["--stream-interval", "-1"], "--stream-interval must be 0..10 seconds"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1 token"),
])
def test_bad_serve_flags_are_one_line_errors(flags, message):
    r = subprocess.run([sys.executable, "-m", "tinychat", "serve", *flags], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_taken_port_is_refused_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tinychat", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "loading" not in r.stderr
