"""`tinychat chat`: the REPL driven through prompt_toolkit's pipe input over a ChatSession with the default
model (commands, interruption, context overflow, save/load as a user types them), and piped stdin
(in-process and as a real subprocess). The session core alone is tested in test_session.py."""

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tinychat.chat import ChatRepl, history_path, make_prompt_session
from tinychat.generate import GenerationResponse, GenerationStats, stream_generate
from tinychat.sampling import SamplingParams
from tinychat.session import ChatSession

pytest.importorskip("prompt_toolkit")
from prompt_toolkit.input import create_pipe_input  # noqa: E402
from prompt_toolkit.output import DummyOutput  # noqa: E402

QUESTION = "What is the capital of France?"
CTRL_C, CTRL_D, ESC_ENTER = "\x03", "\x04", "\x1b\r"


@pytest.fixture(scope="module")
def engine(default_model_dir):
    """The default model, loaded once for the module; fp32 keeps greedy replies deterministic."""
    from tinychat.engine import load_engine
    from tinychat.hub import DEFAULT_MODEL

    return load_engine(DEFAULT_MODEL, "fp32", quiet=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core runner, two threads were ten times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env(state_dir):
    return {**os.environ, "XDG_STATE_HOME": str(state_dir), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """The input history goes to a temporary XDG state dir, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def greedy(max_tokens=8):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def drive(chat, keys):
    """Type `keys` into a real PromptSession over a pipe; return (exit code, replies + notices)."""
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        rc = ChatRepl(chat, make_prompt_session(input=pipe, output=DummyOutput()), out=out).run()
    return rc, out.getvalue()


def recording_stream(log, stream_fn=stream_generate):
    """Wrap a stream function to keep each reply's final stats."""
    def stream(*args, **kwargs):
        response = None
        for response in stream_fn(*args, **kwargs):
            yield response
        log.append(response.stats)
    return stream


def canned_stream(reply="Sure."):
    """A stream that answers without the model, for tests about everything but generation."""
    def stream(model, tokenizer, ids, params, cache, stop_strings=(), decoder=None):
        stats = GenerationStats(prompt_tokens=len(ids), prefilled_tokens=len(ids), generated_tokens=2)
        yield GenerationResponse(reply[:2], 0, None, stats)
        yield GenerationResponse(reply[2:], 2, "stop", stats)
    return stream


def interrupting_stream(after):
    """The real stream, with Ctrl-C arriving after `after` responses (as SIGINT would mid-reply)."""
    def stream(*args, **kwargs):
        for n, response in enumerate(stream_generate(*args, **kwargs)):
            if n == after:
                raise KeyboardInterrupt
            yield response
    return stream


# ----------------------------------------------------------------------------------------------------------
# The REPL with the default model


def test_two_turns_prefill_only_the_new_turn(engine, state_dir):
    log = []
    chat = ChatSession(engine, greedy(7), stream_fn=recording_stream(log))
    rc, out = drive(chat, f"{QUESTION}\rAnd what is the capital of Germany?\r{CTRL_D}")
    assert rc == 0
    assert "Paris" in out and "Berlin" in out
    assert out.count("tok/s") == 2  # a status line after each reply
    first, second = log
    assert first.prefilled_tokens == first.prompt_tokens
    # Turn 2 re-renders the whole conversation but computes only the tail the cache does not hold.
    assert second.prompt_tokens > first.prompt_tokens + first.generated_tokens
    assert second.prefilled_tokens < second.prompt_tokens - first.prompt_tokens
    assert [m["role"] for m in chat.conversation.messages] == ["user", "assistant"] * 2
    # The reused cache gives the same reply as prefilling the whole conversation afresh.
    ids = engine.encode_chat(chat.conversation.template_messages(chat.conversation.messages[:3]))
    fresh = "".join(r.text for r in stream_generate(engine.model, engine.tokenizer, ids, greedy(7)))
    assert chat.conversation.messages[3]["content"] == fresh
    assert (state_dir / "tinychat" / "history").read_text().count(QUESTION) == 1


def test_ctrl_c_mid_reply_keeps_partial_reply_and_continues(engine):
    chat = ChatSession(engine, greedy(32), stream_fn=interrupting_stream(after=3))
    rc, out = drive(chat, f"{QUESTION}\r{CTRL_D}")
    assert rc == 0 and "interrupted" in out
    partial = chat.conversation.messages[-1]
    assert partial["interrupted"] and partial["content"] and len(partial["content"]) < 40
    assert chat.cache.offset == len(chat.cache.token_ids)
    # The next turn works and still reuses the cache.
    log = []
    chat.stream_fn = recording_stream(log)
    chat.params = greedy(4)
    rc, out = drive(chat, f"Thanks!\r{CTRL_D}")
    assert rc == 0 and "tok/s" in out
    assert log[0].prefilled_tokens < log[0].prompt_tokens // 2
    assert chat.conversation.turns == 2


def test_ctrl_c_before_the_first_token_takes_the_message_back(engine):
    chat = ChatSession(engine, greedy(), stream_fn=interrupting_stream(after=0))
    rc, out = drive(chat, f"{QUESTION}\r{CTRL_D}")
    assert rc == 0 and "not kept" in out
    assert chat.conversation.messages == []


def test_context_overflow_drops_oldest_turns_and_keeps_system(engine):
    chat = ChatSession(engine, greedy(3), system="Answer in one short sentence.", max_context=56)
    questions = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a country."]
    rc, out = drive(chat, "\r".join(questions) + "\r" + CTRL_D)
    assert rc == 0
    assert "context full: dropped the oldest" in out and "system prompt stays" in out
    assert out.count("tok/s") == len(questions)  # every message was answered
    assert chat.conversation.system == "Answer in one short sentence."
    assert chat.conversation.messages[-2]["content"] == questions[-1]
    assert chat.conversation.messages[0]["content"] != questions[0]
    assert chat.cache.offset <= 56
    # One message too long for the whole context: a one-line notice, nothing sent, the chat goes on.
    before = list(chat.conversation.messages)
    rc, out = drive(chat, "tell me " * 60 + f"\r/stats\r{CTRL_D}")
    assert rc == 0 and "message too long" in out and "not sent" in out
    assert chat.conversation.messages == before
    assert "context:" in out


def test_piped_whole_input_in_process(engine):
    from tinychat.chat import run

    args = SimpleNamespace(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=None,
                           max_tokens=6, max_context=None, whole_input=True, system=None)
    out, info = io.StringIO(), io.StringIO()
    rc = run(args, stdin=io.StringIO("What is the capital\nof France?\n"), out=out, info=info, engine=engine)
    assert rc == 0 and "Paris" in out.getvalue()
    assert "tok/s" in info.getvalue() and "tok/s" not in out.getvalue()  # replies only on stdout


# ----------------------------------------------------------------------------------------------------------
# Input handling, commands, save/load (canned replies: no generation needed)


def test_multiline_input_paste_and_ctrl_c_at_a_non_empty_prompt(engine):
    chat = ChatSession(engine, greedy(), stream_fn=canned_stream())
    paste = "\x1b[200~first pasted line\r\nsecond pasted line\x1b[201~"
    rc, _ = drive(chat, f"line one{ESC_ENTER}line two\r{paste}\rdiscard me{CTRL_C}//slash message\r{CTRL_D}")
    assert rc == 0
    users = [m["content"] for m in chat.conversation.messages if m["role"] == "user"]
    assert users == ["line one\nline two", "first pasted line\nsecond pasted line", "/slash message"]


@pytest.mark.parametrize("key", [CTRL_C, CTRL_D])
def test_ctrl_c_or_ctrl_d_at_an_empty_prompt_exits_cleanly(engine, key):
    chat = ChatSession(engine, greedy(), stream_fn=canned_stream())
    assert drive(chat, key) == (0, "")


def test_commands_set_reset_system_help_unknown(engine):
    chat = ChatSession(engine, greedy(), stream_fn=canned_stream())
    keys = ["/set temperature 0.3", "/set top_p 0.5", "/set top-k 40", "/set max_tokens 12",
            "/set temperature -1", "/set top_p abc", "/set max_tokens 0", "/set colour 3", "/set top_k",
            "/frobnicate", "/system You are terse.", "/system", "hello", "/reset", "/help", "/exit",
            "never sent"]
    rc, out = drive(chat, "\r".join(keys) + "\r")
    assert rc == 0
    params = chat.params
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.3, 0.5, 40, 12)
    lines = out.splitlines()
    assert "temperature = 0.3" in lines
    assert "/set temperature: temperature must be >= 0 (0 means greedy), got -1.0" in lines
    assert "/set top_p: 'abc' is not a number" in lines
    assert any(line.startswith("/set max_tokens: max_tokens must be an integer >= 1") for line in lines)
    assert any(line.startswith("/set: unknown setting 'colour'; use one of temperature") for line in lines)
    assert any(line.startswith("/set top_k: give one value") for line in lines)
    assert "unknown command /frobnicate; type /help for the list" in lines
    assert "system prompt: 'You are terse.'" in lines
    assert any("/save FILE" in line for line in lines)
    # /reset forgot the turn but kept the system prompt; /exit stopped before the last line.
    assert chat.conversation.messages == [] and chat.conversation.system == "You are terse."
    assert chat.totals.turns == 1


def test_save_load_round_trip(engine, tmp_path):
    chat = ChatSession(engine, greedy(), system="Be kind.", stream_fn=canned_stream("Hello there!"))
    path = tmp_path / "talk.json"
    rc, out = drive(chat, f"hi\rhow are you?\r/save {path}\r/reset\r/load {path}\r{CTRL_D}")
    assert rc == 0 and f"saved 4 messages to {path}" in out and "loaded 4 messages" in out
    saved = json.loads(path.read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be kind."}
    assert [m["content"] for m in saved["messages"][1:]] == ["hi", "Hello there!", "how are you?", "Hello there!"]
    assert chat.conversation.to_json() == saved
    # Bad files get a one-line hint and leave the conversation alone.
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "roles.json").write_text(json.dumps([{"role": "robot", "content": "x"}]))
    rc, out = drive(chat, f"/load {tmp_path}/bad.json\r/load {tmp_path}/roles.json\r/load {tmp_path}/nope.json\r"
                          f"/save {tmp_path}/no/such/dir/x.json\r/save\r{CTRL_D}")
    lines = out.splitlines()
    assert any("bad.json: not valid JSON" in line for line in lines)
    assert any("roles.json: messages[0].role: expected one of system, user, assistant" in line for line in lines)
    assert any("nope.json: no such file" in line for line in lines)
    assert any(line.startswith(f"/save {tmp_path}/no/such/dir/x.json: cannot write") for line in lines)
    assert "/save needs a file name, e.g. /save chat.json" in lines
    assert chat.conversation.to_json() == saved


def test_history_path_follows_xdg(state_dir, monkeypatch):
    assert history_path() == state_dir / "tinychat" / "history"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
    assert history_path() == Path.home() / ".local" / "state" / "tinychat" / "history"


# ----------------------------------------------------------------------------------------------------------
# The command line: piped stdin and a real terminal


def test_echo_question_piped_to_tinychat_chat(default_model_dir, state_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tinychat", "chat", "--precision", "fp32", "--temperature", "0", "--max-tokens", "16"],
        input=QUESTION + "\n", capture_output=True, text=True, timeout=300,
        env=child_env(state_dir))
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "loading" in result.stderr and "tok/s" in result.stderr


def test_bad_max_context_is_a_one_line_error(capsys):
    from tinychat.cli import main

    assert main(["chat", "--max-context", "0", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tinychat: error: --max-context must be a positive number of tokens, got 0"]


def _read_until(fd, done, timeout, seen=b""):
    """Read the terminal until done(seen) holds; fail with what arrived on timeout or when it closes."""
    deadline = time.monotonic() + timeout
    while not done(seen):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timed out; the terminal showed {seen[-500:]!r}")
        try:
            seen += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            raise AssertionError(f"the terminal closed; it showed {seen[-500:]!r}") from None
    return seen


def _controlling_terminal():
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # Ctrl-C on the terminal then sends SIGINT to the chat


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_real_terminal_ctrl_c_stops_a_reply_and_ctrl_d_exits(default_model_dir, state_dir):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinychat", "chat", "--precision", "fp32", "--temperature", "0",
         "--max-tokens", "400"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=_controlling_terminal,
        env={**child_env(state_dir), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"})
    os.close(slave)
    try:
        seen = _read_until(master, lambda s: b">>>" in s, 240)
        os.write(master, b"Write a long story about a dragon who learns to paint.\r")
        # prompt_toolkit turns bracketed paste off (ESC[?2004l) when it hands the line over; the reply follows.
        seen = _read_until(master, lambda s: b"\x1b[?2004l" in s, 60, seen)
        mark = len(seen)
        seen = _read_until(master, lambda s: len(s) > mark + 40, 120, seen)
        os.write(master, CTRL_C.encode())
        seen = _read_until(master, lambda s: b"interrupted]" in s, 60, seen)
        _read_until(master, lambda s: b">>>" in s[s.rfind(b"interrupted]"):], 60, seen)
        os.write(master, CTRL_D.encode())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
