"""The session core shared by every front end (the terminal chat, the OpenAI-compatible server):
no terminal, no prompt_toolkit, no HTTP.

- Conversation: the messages, rendering them to token ids, dropping the oldest turns to fit the
  context (the system prompt stays), JSON save/load. Knows nothing about models.
- parse_messages: an OpenAI-style `messages` list, validated, as a Conversation (the server's requests
  and /load's files go through it).
- ChatSession: one engine + one KV cache + a Conversation. `send(text)` streams one reply; the cache
  keeps the rendered conversation, so each turn prefills only what changed since the last one.
- Commands: /help, /reset, /system, /set, /stats, /save, /load, /exit, one small function each;
  handle_command runs one line and reports through a `say` callback.

Importing this module is cheap: torch is imported where it is used.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import write_text
from .errors import TinychatError

Encode = Callable[[list[dict]], list[int]]  # messages -> token ids ready for the assistant's reply

SAVE_FORMAT = "tinychat-conversation"
SAVE_VERSION = 1
ROLES = ("system", "user", "assistant")

# ----------------------------------------------------------------------------------------------------------
# Conversation


class MessageTooLong(TinychatError):
    """The newest message does not fit the context even with every older turn dropped."""

    def __init__(self, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"message too long: {tokens} tokens with the chat template and system prompt, but "
                         f"only {limit} fit before the reply; shorten it or raise --max-context (not sent)")


class Conversation:
    """The system prompt (kept apart, so dropping turns never touches it) and the user/assistant messages.

    A turn is a user message and what follows it up to the next user message (normally one reply).
    """

    def __init__(self, system: str | None = None):
        self.system = system or None
        self.messages: list[dict] = []  # {"role", "content"} plus "interrupted": True on cut-off replies

    def __len__(self) -> int:
        return len(self.messages)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, text: str, interrupted: bool = False) -> None:
        message = {"role": "assistant", "content": text}
        if interrupted:
            message["interrupted"] = True
        self.messages.append(message)

    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self.messages.clear()

    def template_messages(self, messages: list[dict] | None = None) -> list[dict]:
        """What the chat template sees: role and content only, the system prompt first."""
        messages = self.messages if messages is None else messages
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(self, encode: Encode) -> list[int]:
        return encode(self.template_messages())

    def _turn_starts(self) -> list[int]:
        starts = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if self.messages and (not starts or starts[0] != 0):
            starts.insert(0, 0)  # leading replies without a user message (a loaded file) form a turn
        return starts

    @property
    def turns(self) -> int:
        return len(self._turn_starts())

    def drop_oldest_turn(self) -> bool:
        starts = self._turn_starts()
        if len(starts) < 2:
            return False  # never drop the newest turn
        del self.messages[:starts[1]]
        return True

    def drop_last_turn(self) -> None:
        """Take back the newest turn (a message that was never answered)."""
        starts = self._turn_starts()
        if starts:
            del self.messages[starts[-1]:]

    def fit(self, encode: Encode, limit: int) -> tuple[list[int], int]:
        """Token ids of the conversation in at most `limit` tokens, and how many old turns were dropped.

        Raises MessageTooLong, leaving the conversation untouched, when the newest turn cannot fit even alone.
        """
        ids = self.render(encode)
        if len(ids) <= limit:
            return ids, 0
        starts = self._turn_starts()
        alone = encode(self.template_messages(self.messages[starts[-1]:] if starts else []))
        if len(alone) > limit:
            raise MessageTooLong(len(alone), limit)
        dropped = 0
        while len(ids) > limit and self.drop_oldest_turn():
            dropped += 1
            ids = self.render(encode)
        return ids, dropped

    # -- JSON ------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "messages": [dict(m) for m in messages]}

    def save(self, path: str | Path) -> Path:
        # Temp file + rename: a full disk must not truncate an earlier save of the same name.
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        return write_text(Path(path).expanduser(), text, "/save")

    @classmethod
    def from_json(cls, data, where: str = "conversation") -> Conversation:
        """Our own save format, or a bare list of {"role", "content"} messages (the OpenAI shape)."""
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise TinychatError(f"{where}: expected a list of messages or an object with \"messages\"; "
                                "load a file written by /save")
        if not messages:
            return cls()  # /save of a conversation with no turns and no system prompt
        try:
            conversation = parse_messages(messages, f"{where}: messages")
        except TinychatError as e:
            raise TinychatError(f"{e}; fix the file or load one written by /save") from None
        # parse_messages takes a system message only first, and keeps the others in order.
        rest = messages[1:] if messages[0]["role"] == "system" else messages
        for kept, m in zip(conversation.messages, rest):
            if kept["role"] == "assistant" and m.get("interrupted"):
                kept["interrupted"] = True
        return conversation

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TinychatError(f"{path}: no such file; give a file written by /save") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TinychatError(f"cannot read {path} ({e}); give a file written by /save") from None
        except json.JSONDecodeError as e:
            raise TinychatError(f"{path}: not valid JSON ({e}); give a file written by /save") from None
        return cls.from_json(data, str(path))


def parse_messages(messages, where: str = "messages") -> Conversation:
    """An OpenAI-style `messages` list as a Conversation, or a one-line TinychatError naming the bad index.

    Each item is {"role": "system" | "user" | "assistant", "content": ...}; content is a string or a list of
    text parts [{"type": "text", "text": "..."}] (joined with ""). A system message may only come first.
    Other keys (name, interrupted, ...) are ignored. `where` prefixes every message, e.g. "messages[2].role".
    """
    if not isinstance(messages, list):
        raise TinychatError(f"{where}: expected a list of messages, got {_json_type(messages)}")
    if not messages:
        raise TinychatError(f"{where}: empty; give at least one message")
    conversation = Conversation()
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise TinychatError(f"{at}: expected an object with \"role\" and \"content\", got {_json_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            got = repr(role) if isinstance(role, str) else _json_type(role)
            raise TinychatError(f"{at}.role: expected one of {', '.join(ROLES)}, got {got}")
        content = _message_text(m.get("content"), f"{at}.content")
        if role == "system":
            if i != 0:
                raise TinychatError(f"{at}: a system message is allowed only as the first message")
            conversation.system = content or None
        elif role == "user":
            conversation.add_user(content)
        else:
            conversation.add_assistant(content)
    return conversation


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TinychatError(f"{where}: expected a string or a list of text parts, got {_json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a part of type {kind!r}" if isinstance(kind, str) else _json_type(part)
            raise TinychatError(f"{where}[{j}]: expected a text part {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {what}; only text is supported")
        if not isinstance(part.get("text"), str):
            raise TinychatError(f"{where}[{j}].text: expected a string, got {_json_type(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _json_type(value) -> str:
    """How a parsed JSON value reads in an error message."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------------------
# ChatSession: the model side of a conversation


@dataclass
class TurnResult:
    text: str
    finish_reason: str  # "stop", "length" (max tokens), "context" (the cache filled up), "interrupted"
    stats: object | None  # GenerationStats of the reply; None when interrupted before generation began
    dropped_turns: int = 0


@dataclass
class Totals:
    turns: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0


class ChatSession:
    """One conversation with one model. The KV cache outlives turns, so only new tokens are prefilled.

    `stream_fn` has stream_generate's signature; tests wrap it (e.g. to raise KeyboardInterrupt mid-reply).
    """

    def __init__(self, engine, params, system: str | None = None, max_context: int | None = None,
                 stream_fn: Callable | None = None):
        if stream_fn is None:
            from .generate import stream_generate as stream_fn
        self.engine = engine
        self.params = params
        self.conversation = Conversation(system)
        self.cache = engine.model.make_cache(max_context)
        self.stream_fn = stream_fn
        self.last: TurnResult | None = None
        self.totals = Totals()

    @property
    def reply_reserve(self) -> int:
        """Cache positions kept free for the reply when old turns are dropped to make room."""
        return max(1, min(self.params.max_tokens, self.cache.max_seq // 4))

    def send(self, text: str, on_text: Callable[[str], None] = lambda s: None,
             on_notice: Callable[[str], None] = lambda s: None) -> TurnResult:
        """Add a user message and stream the reply through on_text. Ctrl-C (KeyboardInterrupt) ends the
        reply early: what arrived is kept as an interrupted reply, or the turn is taken back if nothing did.

        Raises MessageTooLong (the message is not added) when it cannot fit the context.
        """
        conversation = self.conversation
        conversation.add_user(text)
        try:
            ids, dropped = conversation.fit(self.engine.encode_chat, self.cache.max_seq - self.reply_reserve)
        except BaseException:
            conversation.drop_last_turn()
            raise
        if dropped:
            on_notice(f"context full: dropped the oldest {_plural(dropped, 'turn')}"
                      + (" (the system prompt stays)" if conversation.system else ""))

        pieces: list[str] = []
        response = None
        stream = self.stream_fn(self.engine.model, self.engine.tokenizer, ids, self.params, self.cache,
                                decoder=self.engine.decoder)
        try:
            for response in stream:
                if response.text:
                    pieces.append(response.text)
                    on_text(response.text)
            reason = response.finish_reason if response is not None else "stop"
        except KeyboardInterrupt:
            reason = "interrupted"
            stream.close()
            self._repair_cache()
        except BaseException:
            conversation.drop_last_turn()
            self._repair_cache()
            raise
        if reason == "length" and self.cache.room == 0:
            reason = "context"

        reply = "".join(pieces)
        stats = response.stats if response is not None else None
        if reason == "interrupted" and not reply:
            conversation.drop_last_turn()  # nothing to keep; the message stays in the input history
        else:
            conversation.add_assistant(reply, interrupted=reason == "interrupted")
            self.totals.turns += 1
        if stats is not None:
            self.totals.prompt_tokens += stats.prompt_tokens
            self.totals.prefilled_tokens += stats.prefilled_tokens
            self.totals.generated_tokens += stats.generated_tokens
        self.last = TurnResult(reply, reason, stats, dropped)
        return self.last

    def _repair_cache(self) -> None:
        # An interrupt can land between the cache's offset update and its token bookkeeping; a cache whose
        # tokens no longer describe its positions could be reused wrongly, so start it afresh instead.
        if self.cache.offset != len(self.cache.token_ids):
            self.cache.reset()

    def reset(self) -> None:
        """Forget the turns. The cache keeps its tokens: the system prompt's prefix is reused next turn."""
        self.conversation.reset()

    def set_param(self, name: str, value) -> None:
        """Change one sampling parameter, validated (TinychatError on a bad value, nothing changed)."""
        params = dataclasses.replace(self.params, **{name: value})
        params.validate()
        self.params = params


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def status_line(result: TurnResult) -> str:
    """One line after each reply: tokens, time to first token, decode speed, and why it ended early."""
    notes = {"length": "max tokens reached (/set max_tokens N)", "context": "context full",
             "interrupted": "interrupted"}
    parts = []
    if result.stats is not None:
        s = result.stats
        parts += [_plural(s.generated_tokens, "token"), f"{s.time_to_first_token:.2f} s to first token",
                  f"{s.decode_tps:.1f} tok/s"]
    if result.finish_reason in notes:
        parts.append(notes[result.finish_reason])
    return "[" + " · ".join(parts) + "]"


# ----------------------------------------------------------------------------------------------------------
# Commands


class ExitChat(Exception):
    """Raised by /exit."""


# /set NAME VALUE: the parameter's type, and the flag whose validation message mentions it.
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
            "repetition_penalty": float, "max_tokens": int, "seed": int}


def cmd_help(chat: ChatSession, arg: str, say) -> None:
    say("commands:")
    for name, (_, usage, text) in COMMANDS.items():
        say(f"  /{usage:<24} {text}")
    say("keys: Enter sends · Esc+Enter or Alt+Enter inserts a newline · Ctrl-C stops a reply · "
        "Ctrl-D or /exit quits · start a message with // to send one beginning with /")


def cmd_reset(chat: ChatSession, arg: str, say) -> None:
    chat.reset()
    say("conversation cleared" + (" (the system prompt stays)" if chat.conversation.system else ""))


def cmd_system(chat: ChatSession, arg: str, say) -> None:
    if not arg:
        current = chat.conversation.system
        say(f"system prompt: {current!r}" if current else "no system prompt (the model's template default applies)")
        say("set it with /system TEXT")
        return
    chat.conversation.system = arg
    say("system prompt set")


def cmd_set(chat: ChatSession, arg: str, say) -> None:
    names = ", ".join(SETTABLE)
    if not arg:
        say("  ".join(f"{n}={getattr(chat.params, n)}" for n in SETTABLE))
        return
    parts = arg.split()
    name = parts[0].replace("-", "_").lower()
    if name not in SETTABLE:
        raise TinychatError(f"/set: unknown setting {parts[0]!r}; use one of {names}")
    if len(parts) != 2:
        raise TinychatError(f"/set {name}: give one value, e.g. /set {name} {getattr(chat.params, name)}")
    kind, raw = SETTABLE[name], parts[1]
    if name == "seed" and raw.lower() == "none":
        value = None
    else:
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise TinychatError(f"/set {name}: {raw!r} is not {what}") from None
    try:
        chat.set_param(name, value)
    except TinychatError as e:
        # The validation messages name the command-line flag; say it the way the user typed it here.
        raise TinychatError(f"/set {name}: {str(e).replace('--' + name.replace('_', '-'), name)}") from None
    say(f"{name} = {value}")


def cmd_stats(chat: ChatSession, arg: str, say) -> None:
    cache, totals = chat.cache, chat.totals
    say(f"context: {cache.offset}/{cache.max_seq} tokens cached · {_plural(chat.conversation.turns, 'turn')}"
        f" · reply room kept when full: {chat.reply_reserve}")
    if chat.last is not None and chat.last.stats is not None:
        say(f"last reply: {chat.last.stats.summary()}")
    say(f"session: {_plural(totals.turns, 'reply', 'replies')}, {totals.prompt_tokens} prompt tokens "
        f"({totals.prefilled_tokens} prefilled, the rest from the cache), {totals.generated_tokens} generated")


def cmd_save(chat: ChatSession, arg: str, say) -> None:
    if not arg:
        raise TinychatError("/save needs a file name, e.g. /save chat.json")
    path = chat.conversation.save(arg)
    say(f"saved {_plural(len(chat.conversation), 'message')} to {path}")


def cmd_load(chat: ChatSession, arg: str, say) -> None:
    if not arg:
        raise TinychatError("/load needs a file name, e.g. /load chat.json")
    chat.conversation = Conversation.load(arg)
    say(f"loaded {_plural(len(chat.conversation), 'message')} from {Path(arg).expanduser()}"
        + (" (with its system prompt)" if chat.conversation.system else ""))


def cmd_exit(chat: ChatSession, arg: str, say) -> None:
    raise ExitChat


COMMANDS = {
    "help": (cmd_help, "help", "show this help"),
    "reset": (cmd_reset, "reset", "start a new conversation (keeps the system prompt)"),
    "system": (cmd_system, "system TEXT", "set the system prompt (without TEXT: show it)"),
    "set": (cmd_set, "set NAME VALUE", "change temperature, top_p, top_k, max_tokens, ... (alone: show)"),
    "stats": (cmd_stats, "stats", "context use, last reply speed, session totals"),
    "save": (cmd_save, "save FILE", "write the conversation as JSON"),
    "load": (cmd_load, "load FILE", "replace the conversation with one from /save"),
    "exit": (cmd_exit, "exit", "quit (also /quit, Ctrl-D)"),
}
ALIASES = {"quit": "exit", "q": "exit", "?": "help", "clear": "reset"}


def handle_command(chat: ChatSession, line: str, say: Callable[[str], None]) -> None:
    """Run one /command line. Raises ExitChat for /exit and TinychatError (one line) for mistakes."""
    name, _, arg = line[1:].strip().partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in COMMANDS:
        raise TinychatError(f"unknown command /{name}; type /help for the list")
    COMMANDS[name][0](chat, arg.strip(), say)
