"""`tinychat chat`: the terminal front end over the session core (tinychat/session.py).

- ChatRepl: the read-eval-print loop over a ChatSession, reading from a prompt_toolkit PromptSession
  (make_prompt_session: key bindings, input history in the XDG state directory, command completion).
- run_piped: stdin is not a TTY; each line (or all of stdin) is a message, replies go to stdout.
- register/run: the `chat` subcommand of the CLI.

Importing this module is cheap (the CLI imports it to build its parser): torch and prompt_toolkit are
imported where they are used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, TextIO

from .errors import TinychatError
from .session import ALIASES, COMMANDS, SETTABLE, ChatSession, ExitChat, TurnResult, handle_command, status_line

# ----------------------------------------------------------------------------------------------------------
# Front ends


def history_path() -> Path:
    """The input history file in the XDG state directory (relative XDG paths are ignored, as the spec says)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "tinychat" / "history"


def make_prompt_session(input=None, output=None, history_file: str | Path | None = None):
    """A PromptSession where Enter sends, Esc+Enter (Alt+Enter) inserts a newline, pasted text is kept as
    is (bracketed paste), Ctrl-C clears a non-empty line and exits at an empty one, and Ctrl-D exits."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("enter")
    def _send(event):
        event.current_buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    path = Path(history_file) if history_file is not None else history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()  # a read-only home must not stop the chat

    words = ["/" + name for name in [*COMMANDS, *ALIASES]] + [f"/set {n}" for n in SETTABLE]
    return PromptSession(
        message=">>> ", multiline=True, prompt_continuation="... ", key_bindings=bindings, history=history,
        completer=WordCompleter(words, sentence=True), complete_while_typing=False,
        input=input, output=output)


class ChatRepl:
    """The read-eval-print loop over a ChatSession. `prompt` is anything with a .prompt() -> str method
    (a PromptSession from make_prompt_session in real use); replies go to `out`, everything else to `info`."""

    def __init__(self, chat: ChatSession, prompt, out: TextIO | None = None, info: TextIO | None = None,
                 interrupt_ends: bool = False):
        self.chat = chat
        self.prompt = prompt
        self.out = out or sys.stdout
        self.info = info or self.out
        self.interrupt_ends = interrupt_ends  # piped input: Ctrl-C ends the run instead of one reply
        self._dim = _isatty(self.info)

    def say(self, text: str) -> None:
        if self._dim:
            text = f"\x1b[2m{text}\x1b[0m"
        print(text, file=self.info, flush=True)

    def run(self) -> int:
        while True:
            try:
                line = self.prompt.prompt()
            except (KeyboardInterrupt, EOFError):  # Ctrl-C / Ctrl-D at an empty prompt
                return 0
            try:
                self.handle(line)
            except ExitChat:
                return 0

    def handle(self, line: str) -> None:
        """One input: a /command, a message (// escapes a leading slash), or nothing."""
        if not line.strip():
            return
        try:
            if line.startswith("//"):
                self.send(line[1:])
            elif line.startswith("/"):
                handle_command(self.chat, line, self.say)
            else:
                self.send(line)
        except TinychatError as e:
            self.say(str(e))
        except KeyboardInterrupt:  # Ctrl-C outside the reply itself (e.g. while rendering the prompt)
            if self.interrupt_ends:
                raise
            self.say("[interrupted]")

    def send(self, text: str) -> TurnResult:
        def write(delta: str) -> None:
            self.out.write(delta)
            self.out.flush()

        result = self.chat.send(text, on_text=write, on_notice=lambda s: self.say(f"[{s}]"))
        if result.text and not result.text.endswith("\n"):
            write("\n")
        if result.finish_reason == "interrupted" and not result.text:
            self.say("[interrupted before the reply began; the message was not kept]")
        else:
            self.say(status_line(result))
        if result.finish_reason == "interrupted" and self.interrupt_ends:
            raise KeyboardInterrupt
        return result


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _LinePrompt:
    """A .prompt() over lines of a text stream, so piped input runs through the same loop as the REPL."""

    def __init__(self, lines: Iterable[str]):
        self._lines = iter(lines)

    def prompt(self) -> str:
        try:
            return next(self._lines).rstrip("\r\n")
        except StopIteration:
            raise EOFError from None


def run_piped(chat: ChatSession, stdin: TextIO, out: TextIO, info: TextIO, whole_input: bool = False) -> int:
    """Non-interactive: each line of stdin is a message or /command (or all of stdin is one message);
    replies go to `out`, status lines and notices to `info`."""
    repl = ChatRepl(chat, _LinePrompt(stdin), out=out, info=info, interrupt_ends=True)
    if not whole_input:
        return repl.run()
    text = stdin.read().strip()
    if not text:
        raise TinychatError("--whole-input: stdin was empty; pipe the message in, e.g. `tinychat chat "
                            "--whole-input < question.txt`")
    repl.send(text)  # one message, one answer: a message that cannot be sent is a usage error (exit 2)
    return 0


# ----------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    from .args import add_model_args, add_sampling_args

    p = subparsers.add_parser(
        "chat", help="chat in the terminal (multi-turn, streaming); reads messages from stdin when piped",
        description="Interactive chat: Enter sends, Esc+Enter inserts a newline, Ctrl-C stops a reply, "
                    "Ctrl-D quits, /help lists commands. With stdin not a terminal, each line is a message "
                    "(or all of stdin with --whole-input) and the replies go to stdout.")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length in tokens (default: the model's context, at most 8192); "
                        "the oldest turns are dropped when it fills")
    p.add_argument("--whole-input", action="store_true",
                   help="with piped stdin: send all of it as one message instead of one message per line")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args, stdin: TextIO | None = None, out: TextIO | None = None, info: TextIO | None = None,
        engine=None, prompt_factory: Callable = make_prompt_session) -> int:
    from .args import sampling_from_args

    stdin, out, info = stdin or sys.stdin, out or sys.stdout, info or sys.stderr
    params = sampling_from_args(args)
    if args.max_context is not None and args.max_context < 1:
        raise TinychatError(f"--max-context must be a positive number of tokens, got {args.max_context}")
    interactive = _isatty(stdin)
    if interactive and args.whole_input:
        raise TinychatError("--whole-input reads a piped message; use `tinychat chat --whole-input < FILE` "
                            "or drop the flag to chat interactively")
    if engine is None:
        from .engine import load_engine_from_args

        engine = load_engine_from_args(args)
    chat = ChatSession(engine, params, system=args.system, max_context=args.max_context)
    if not interactive:
        try:
            return run_piped(chat, stdin, out, info, args.whole_input)
        except BrokenPipeError:
            if out is not sys.stdout:
                raise
            # The reader went away (`| head`): stop quietly like other Unix tools, and keep Python's
            # final flush of stdout from complaining.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    repl = ChatRepl(chat, prompt_factory(), out=out, info=out)
    repl.say(f"{engine.path.name} · context {chat.cache.max_seq} tokens · Enter sends, Esc+Enter newline, "
             "Ctrl-C stops a reply, Ctrl-D quits, /help for commands")
    return repl.run()
