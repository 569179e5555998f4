"""The OpenAI wire format, without HTTP: request bodies -> validated generation requests, events -> response
bodies and stream chunks, mistakes -> OpenAI-shaped errors. tinychat.server puts it behind FastAPI.

Fields follow the OpenAI API (chat completions and legacy completions); top_k, min_p and
repetition_penalty are extensions that llama.cpp's server and vLLM accept too. Unknown fields are ignored,
as OpenAI's SDKs send some that a local engine has no use for (user, store, metadata, ...).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from .batching import DoneEvent, TokenEvent
from .errors import TinychatError
from .sampling import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------------------
# Field readers: each checks one field's type and range and names it in the error.


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"expected a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, f"must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {value}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop", "expected a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    return [s for s in value if s]


# ----------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class GenerationRequest:
    """What the server submits to the scheduler, plus how to answer."""
    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the sampled token's logprob and the k most likely
    processors: list = field(default_factory=list)


class RequestContext:
    """What parsing needs from the served model: its names, tokenizer, chat encoding and context length."""

    def __init__(self, model_ids: list[str], tokenizer, encode_chat, max_seq: int, eos_ids, vocab_size: int):
        self.model_ids, self.tokenizer, self.encode_chat = model_ids, tokenizer, encode_chat
        self.max_seq, self.eos_ids, self.vocab_size = max_seq, eos_ids, vocab_size


def parse_request(body, ctx: RequestContext, chat: bool) -> GenerationRequest:
    """Validate a /v1/chat/completions (chat=True) or /v1/completions body. Raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_body")
    model = body.get("model")
    if model is not None and model not in ctx.model_ids:
        raise APIError(404, f"model {model!r} does not exist; this server serves {ctx.model_ids[0]!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise _bad("n", "only n=1 is supported (one choice per request)")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "only best_of=1 is supported")
    if _boolean(body, "echo"):
        raise _bad("echo", "echo is not supported")

    prompt_ids = _chat_prompt(body, ctx) if chat else _completion_prompt(body, ctx)
    if len(prompt_ids) > ctx.max_seq:
        raise APIError(413, f"the prompt has {len(prompt_ids)} tokens but the context holds {ctx.max_seq}; "
                            "shorten it (or restart the server with a larger --max-context)",
                       param="messages" if chat else "prompt", code="context_length_exceeded")

    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens, 1)
    room = ctx.max_seq - len(prompt_ids) + 1  # the last token is sampled, never written to the cache
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0),
        min_p=_number(body, "min_p", 0.0, 0.0, 0.999999),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
        max_tokens=min(max_tokens or room, room))
    try:
        params.validate()
    except TinychatError as e:  # the readers above cover every field; this is a second line
        raise _bad("body", str(e)) from None

    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "expected an object like {\"include_usage\": true}")
    include_usage = _boolean(options or {}, "include_usage")
    logprobs = _chat_logprobs(body) if chat else _integer(body, "logprobs", None, 0, 5)
    processors = _response_format(body, ctx)
    return GenerationRequest(chat, prompt_ids, params, _stop(body), stream, include_usage, logprobs, processors)


def _chat_prompt(body: dict, ctx: RequestContext) -> list[int]:
    from .session import parse_messages

    if "messages" not in body:
        raise _bad("messages", "required: a list of {\"role\", \"content\"} messages")
    try:
        conversation = parse_messages(body["messages"])
        return ctx.encode_chat(conversation.template_messages())
    except TinychatError as e:
        raise _bad("messages", str(e).removeprefix("messages: ")) from None


def _completion_prompt(body: dict, ctx: RequestContext) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt, add_special_tokens=True)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < ctx.vocab_size for t in prompt):
            raise _bad("prompt", f"token ids must be in [0, {ctx.vocab_size})")
        ids = list(prompt)
    else:
        raise _bad("prompt", "required: a string, a list of token ids, or a list of one of either")
    if not ids:
        raise _bad("prompt", "the prompt is empty")
    return ids


def _chat_logprobs(body: dict) -> int | None:
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise _bad("top_logprobs", "needs \"logprobs\": true")
    return (top or 0) if wanted else None


def _response_format(body: dict, ctx: RequestContext) -> list:
    fmt = body.get("response_format")
    if fmt is None:
        return []
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("response_format", "expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    if fmt["type"] == "text":
        return []
    schema = None
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _bad("response_format", "json_schema must be an object with a \"schema\" object")
        schema = spec.get("schema", {})
    from .grammar import GrammarError, compile_json_grammar, json_processor

    try:
        grammar = compile_json_grammar(ctx.tokenizer, schema)
    except GrammarError as e:
        raise _bad("response_format", str(e)) from None
    return [json_processor(grammar, ctx.vocab_size, ctx.eos_ids)]


# ----------------------------------------------------------------------------------------------------------
# Responses


class Reply:
    """Collects one request's events and renders them as an OpenAI response or as stream chunks."""

    def __init__(self, request: GenerationRequest, model_id: str, tokenizer):
        self.request, self.model_id, self.tokenizer = request, model_id, tokenizer
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"
        self.text: list[str] = []
        self.logprobs: list[dict] = []  # chat-style entries: token, logprob, bytes, top_logprobs
        self.token_chars = 0  # the length of those entries' tokens: the next one's text_offset
        self.done: DoneEvent | None = None

    # -- pieces --------------------------------------------------------------------------------------------

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprob_entry(self, event: TokenEvent) -> dict:
        entry = self._token_entry(event.token, event.logprob)
        entry["top_logprobs"] = [self._token_entry(t, lp) for t, lp in event.top_logprobs or []]
        return entry

    def _render_logprobs(self, entries: list[dict], offset: int = 0):
        if self.request.logprobs is None:
            return None
        if self.request.chat:
            return {"content": entries}
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def usage(self) -> dict:
        done = self.done
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    # -- whole response ------------------------------------------------------------------------------------

    def add(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.text.append(event.text)
            if self.request.logprobs is not None:
                self.logprobs.append(self._logprob_entry(event))
                self.token_chars += len(self.logprobs[-1]["token"])
        else:
            self.done = event

    def response(self) -> dict:
        text = "".join(self.text)
        choice = {"index": 0, "logprobs": self._render_logprobs(self.logprobs),
                  "finish_reason": self.done.finish_reason}
        if self.request.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": [choice], "usage": self.usage()}

    # -- streaming -----------------------------------------------------------------------------------------

    def _chunk(self, delta_text: str | None, finish_reason: str | None, logprobs: list[dict] | None,
               first: bool = False, offset: int = 0) -> dict:
        usage_field = {"usage": None} if self.request.include_usage else {}
        rendered = self._render_logprobs(logprobs, offset) if logprobs is not None else None
        if self.request.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if delta_text is None else
                                                                           {"content": delta_text})
            choice = {"index": 0, "delta": delta, "logprobs": rendered, "finish_reason": finish_reason}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_id, "system_fingerprint": None, "choices": [choice], **usage_field}
        choice = {"index": 0, "text": delta_text or "", "logprobs": rendered, "finish_reason": finish_reason}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": [choice], **usage_field}

    def first_chunks(self) -> list[dict]:
        return [self._chunk(None, None, None, first=True)] if self.request.chat else []

    def chunks(self, events: list) -> list[dict]:
        """The stream chunks a run of events becomes: their tokens as one chunk (the texts joined, the
        logprobs in order; none when no token shows text or carries logprobs), then, after a DoneEvent, the
        finishing chunk and the usage chunk."""
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        offset = self.token_chars  # text_offset of a completion's first token here
        for event in tokens:
            self.add(event)
        chunks = []
        text = "".join(e.text for e in tokens)
        if tokens and (text or self.request.logprobs is not None):
            entries = self.logprobs[-len(tokens):] if self.request.logprobs is not None else None
            chunks.append(self._chunk(text, None, entries, offset=offset))
        done = next((e for e in events if not isinstance(e, TokenEvent)), None)
        if done is None:
            return chunks
        self.done = done
        chunks.append(self._chunk(None, done.finish_reason, None))
        if self.request.include_usage:
            chunks.append({"id": self.id, "object": chunks[-1]["object"], "created": self.created,
                           "model": self.model_id, "system_fingerprint": None, "choices": [],
                           "usage": self.usage()})
        return chunks


def models_list(model_ids: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": model_ids[0], "object": "model", "created": created,
                                        "owned_by": "tinychat"}]}
