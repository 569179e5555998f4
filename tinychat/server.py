"""`tinychat serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one BatchScheduler.

Request handlers run on uvicorn's event loop (a second thread) and never touch the model: they validate
the body (tinychat.openai_api), submit a Job to the scheduler, which decodes on the main thread, and relay
its events (EventRelay). A stream sends its first text at once and then at most one chunk per
--stream-interval, holding every token sampled meanwhile: on a 2-core CPU the HTTP thread and the client
compete with the decode step for the cores, and per-token chunks cost a stream a fifth of its speed (see
the README). A client that goes away cancels its job; the scheduler drops it before its next decode step.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at definition.
import asyncio
import hmac
import json
import socket
import sys
import threading
import time

from .batching import Job, QueueFull, TokenEvent
from .errors import TinychatError
from .generate import PREFILL_CHUNK
from .openai_api import APIError, Reply, RequestContext, error_body, models_list, parse_request

DISCONNECT_POLL_SECONDS = 0.1  # how often a handler checks that its client is still there
STREAM_INTERVAL = 0.05  # default seconds between a stream's chunks after its first text (--stream-interval)


def create_app(scheduler, engine, model_ids: list[str], api_key: str | None = None,
               stream_interval: float = STREAM_INTERVAL):
    """The FastAPI app serving `engine` through `scheduler` under the names `model_ids` (the first is listed);
    a stream's chunks go out at most every `stream_interval` seconds after its first text (0: each token)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from .generate import eos_ids

    app = FastAPI(title="tinychat", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    ctx = RequestContext(model_ids, engine.tokenizer, engine.encode_chat, scheduler.max_seq,
                         eos_ids(engine.model, engine.tokenizer), engine.model.config.vocab_size)

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(error_body(f"invalid request: {e.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    async def _check_key(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key: send the header "
                                               "'Authorization: Bearer KEY' with the server's --api-key",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    if api_key is not None:  # an HTTP middleware puts every response through an extra task: only when needed
        app.middleware("http")(_check_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": scheduler.active, "waiting": scheduler.waiting}

    @app.get("/v1/models")
    async def models():
        return models_list(model_ids, started)

    async def read_body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None

    async def complete(request: Request, chat: bool):
        body = await read_body(request)
        if isinstance(body, dict) and body.get("response_format") is not None:
            # compiling a grammar takes milliseconds: off the event loop
            parsed = await run_in_threadpool(parse_request, body, ctx, chat)
        else:  # templating and tokenizing a prompt take well under a millisecond; a thread hop takes more
            parsed = parse_request(body, ctx, chat)
        relay = EventRelay(request)
        job = Job(parsed.prompt_ids, parsed.params, relay.emit, stop=parsed.stop, processors=parsed.processors,
                  logprobs=parsed.logprobs)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})
        except TinychatError as e:
            raise APIError(400, str(e)) from None
        relay.watch(job)
        reply = Reply(parsed, model_ids[0], engine.tokenizer)
        if parsed.stream:
            return StreamingResponse(stream(relay, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while reply.done is None:
                events = await relay.next_events(until_end=True)  # one wake-up per request, not per token
                if events is None:
                    return JSONResponse(error_body("client closed the request"), status_code=499)
                for event in events:
                    reply.add(event)
        finally:
            relay.close()
        if reply.done.finish_reason == "error":
            return JSONResponse(error_body(reply.done.error or "generation failed", "server_error"), status_code=500)
        return reply.response()

    async def stream(relay: EventRelay, reply: Reply):
        try:
            for chunk in reply.first_chunks():
                yield sse(chunk)
            sent = None  # when the last chunk with text went out (loop time); None before the first
            while reply.done is None:
                events = await relay.next_events(None if sent is None else sent + stream_interval)
                if events is None:
                    return
                failed = events[-1] if getattr(events[-1], "finish_reason", None) == "error" else None
                events = [e for e in events if e is not failed]
                # a chunk per token with no interval (tokens the loop found waiting together included)
                runs = [[e] for e in events] if stream_interval == 0 else [events]
                chunks = [chunk for run in runs for chunk in reply.chunks(run)]
                if failed is not None:
                    reply.done = failed
                    chunks.append(error_body(failed.error or "generation failed", "server_error"))
                if chunks:
                    yield "".join(sse(chunk) for chunk in chunks)
                    if any(isinstance(e, TokenEvent) and e.text for e in events):
                        sent = asyncio.get_running_loop().time()
            yield "data: [DONE]\n\n"
        finally:
            relay.close()  # the reply ended, or the client went away (the response task is cancelled)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


class EventRelay:
    """One request's events, handed over from the scheduler thread: `emit` (that thread) appends to a list
    and wakes the event loop only when the handler waits for what came, so tokens sampled while a stream
    holds back cost no wake-up each. A watcher task checks every DISCONNECT_POLL_SECONDS, whether or not
    tokens flow (a queued request's client may leave before its first token), and when the client has gone
    it cancels the job and ends the relay."""

    def __init__(self, request):
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.job = self.watcher = None
        self.gone = False
        self._lock = threading.Lock()
        self._events: list = []
        self._wake_on: str | None = None  # None: nobody waits; "any": any event; "end": only the last one
        self._waiter = self.loop.create_future()

    def emit(self, event) -> None:
        """The scheduler's callback (its thread): keep the event, and wake the handler if it waits for it."""
        with self._lock:
            self._events.append(event)
            wake = self._wake_on == "any" or (self._wake_on == "end" and not isinstance(event, TokenEvent))
            if wake:
                self._wake_on = None
        if wake:
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # on the loop: a stale wake-up only makes next_events look again
        if not self._waiter.done():
            self._waiter.set_result(None)

    def watch(self, job) -> None:
        """Start watching the client of `job` (submitted)."""
        self.job = job
        self.watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            if await self.request.is_disconnected():
                self.job.cancel()
                self.gone = True
                self._wake()
                return

    async def _wait(self, wake_on: str, timeout: float | None = None) -> None:
        """Wait for emit to see an event of the kind `wake_on` names (or the client to go, or `timeout`)."""
        with self._lock:
            if self._events and (wake_on == "any" or not isinstance(self._events[-1], TokenEvent)):
                return
            self._waiter = self.loop.create_future()
            self._wake_on = wake_on
        timer = self.loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._wake_on = None

    async def next_events(self, not_before: float | None = None, until_end: bool = False) -> list | None:
        """The events since the last call (at least one), not before the loop time `not_before` (or, with
        `until_end`, the job's last event) unless the job ends sooner; None once the client has gone (the
        job is then cancelled)."""
        if until_end and not self.gone:
            await self._wait("end")
        elif not_before is not None and not_before > self.loop.time() and not self.gone:
            await self._wait("end", timeout=not_before - self.loop.time())
        while not self.gone:
            with self._lock:
                if self._events:
                    events, self._events = self._events, []
                    return events
            await self._wait("any")
        return None

    def close(self) -> None:
        """The reply is over (done, failed or abandoned): stop watching and let the job go."""
        if self.watcher is not None:
            self.watcher.cancel()
            self.job.cancel()  # a no-op when it finished


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    from .args import add_model_args

    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API (chat completions, completions)",
        description="An OpenAI-compatible server: POST /v1/chat/completions and /v1/completions (streaming or "
                    "not), GET /v1/models and /health. Concurrent requests decode together (continuous "
                    "batching); recent conversations stay cached, so a resent conversation prefills only "
                    "what is new.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--slots", type=int, default=8,
                   help="sequences decoded together and conversations kept cached (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 (default %(default)s)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="tokens per sequence, prompt and reply (default %(default)s, at most the model's)")
    p.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL, metavar="SECONDS",
                   help="a stream sends its first text at once, then at most one chunk per SECONDS with every "
                        "token sampled meanwhile (default %(default)s; 0: a chunk per token)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens prefilled between two decode steps: a long prompt delays the other "
                        "streams' next token by this many tokens' prefill at a time (default %(default)s)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .batching import BatchScheduler
    from .engine import load_engine_from_args
    from .generate import EagerDecoder

    if not 0 < args.port < 65536:
        raise TinychatError(f"--port must be in 1..65535, got {args.port}")
    if args.max_context < 1:
        raise TinychatError(f"--max-context must be a positive number of tokens, got {args.max_context}")
    if args.slots < 1 or args.max_queue < 0:
        raise TinychatError(f"--slots must be >= 1 and --max-queue >= 0, got {args.slots} and {args.max_queue}")
    if not 0 <= args.stream_interval <= 10:
        raise TinychatError(f"--stream-interval must be 0..10 seconds, got {args.stream_interval}")
    if args.prefill_chunk < 1:
        raise TinychatError(f"--prefill-chunk must be at least 1 token, got {args.prefill_chunk}")
    check_port_free(args.host, args.port)
    engine = load_engine_from_args(args)
    max_seq = min(args.max_context, engine.model.config.max_position_embeddings)
    scheduler = BatchScheduler(engine.model, engine.tokenizer, args.slots, max_seq, args.max_queue,
                               capture=not isinstance(engine.decoder, EagerDecoder),
                               prefill_chunk=args.prefill_chunk)
    model_ids = served_names(args.model, engine.path)
    app = create_app(scheduler, engine, model_ids, args.api_key, args.stream_interval)
    kv_gb = scheduler.cache.nbytes / 1e9
    print(f"serving {model_ids[0]} at http://{args.host}:{args.port}/v1 · {args.slots} slots x {max_seq} tokens "
          f"(KV cache {kv_gb:.2f} GB)" + (" · API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    import threading

    import uvicorn

    # HTTP on a second thread, the model on this one, which loaded it (see BatchScheduler.run for why).
    http = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                         timeout_graceful_shutdown=2))

    def serve_http():
        try:
            http.run()
        finally:
            scheduler.close()  # uvicorn stopped (or failed to start): stop decoding too

    threading.Thread(target=serve_http, name="tinychat-http", daemon=True).start()
    try:
        scheduler.run()
    except KeyboardInterrupt:
        print("\ntinychat: server stopped", file=sys.stderr)
    finally:
        http.should_exit = True
    return 0


def served_names(model_arg: str, path) -> list[str]:
    """The id /v1/models lists (--model as the user gave it) and the other names requests may use for it."""
    return list(dict.fromkeys([model_arg, path.name, str(path)]))


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model when the address is taken (uvicorn would only log and exit)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise TinychatError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
