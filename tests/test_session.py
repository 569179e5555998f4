"""The session core (tinychat/session.py) without a model or a terminal: Conversation (fitting the context,
JSON load), parse_messages (the OpenAI `messages` shape the server and /load share), and that importing it
pulls in neither prompt_toolkit nor torch."""

import json
import subprocess
import sys

import pytest

from tinychat.errors import TinychatError
from tinychat.session import Conversation, MessageTooLong, parse_messages

# ----------------------------------------------------------------------------------------------------------
# Conversation alone (a fake encoder: one token per word)


def word_encode(messages):
    return [0] * sum(len(m["content"].split()) + 2 for m in messages)


def test_conversation_fit_drops_whole_turns_keeps_system_and_rejects_a_lone_long_message():
    conv = Conversation(system="sys prompt")  # 4 tokens
    for i in range(3):
        conv.add_user(f"question {i}")  # 4 tokens
        conv.add_assistant(f"answer number {i}")  # 5 tokens
    conv.add_user("last question")
    ids, dropped = conv.fit(word_encode, 4 + 9 + 4)  # room for one old turn beside the new one
    assert (len(ids), dropped) == (17, 2)
    assert [m["content"] for m in conv.messages] == ["question 2", "answer number 2", "last question"]
    assert conv.system == "sys prompt"
    conv.add_assistant("ok")
    conv.add_user("word " * 50)
    before = list(conv.messages)
    with pytest.raises(MessageTooLong, match="message too long: 56 tokens"):
        conv.fit(word_encode, 20)
    assert conv.messages == before  # the caller decides what to do with it
    conv.drop_last_turn()
    assert conv.messages[-1] == {"role": "assistant", "content": "ok"}


def test_conversation_loads_a_bare_message_list_and_rejects_a_late_system_message():
    conv = Conversation.from_json([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert conv.turns == 1 and conv.system is None
    with pytest.raises(TinychatError, match=r"messages\[1\]: a system message is allowed only as the first"):
        Conversation.from_json({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]})


def test_conversation_json_round_trip_keeps_interrupted_replies_and_an_empty_conversation(tmp_path):
    conv = Conversation(system="Be kind.")
    conv.add_user("hi")
    conv.add_assistant("Hel", interrupted=True)
    loaded = Conversation.load(conv.save(tmp_path / "talk.json"))
    assert loaded.system == "Be kind."
    assert loaded.messages == [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "Hel", "interrupted": True}]
    empty = Conversation.load(Conversation().save(tmp_path / "empty.json"))  # /save right after /reset
    assert (empty.system, empty.messages) == (None, [])


def test_conversation_load_names_the_file_and_the_bad_message(tmp_path):
    path = tmp_path / "parts.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]}))
    with pytest.raises(TinychatError) as e:
        Conversation.load(path)
    assert str(e.value) == (f"{path}: messages[1].content: expected a string or a list of text parts, got a number; "
                            "fix the file or load one written by /save")


# ----------------------------------------------------------------------------------------------------------
# parse_messages: the OpenAI `messages` shape


def test_parse_messages_string_content():
    conv = parse_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert conv.system == "Be brief."
    assert conv.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Bye"}]
    assert conv.turns == 2


def test_parse_messages_joins_text_parts_and_ignores_other_keys():
    conv = parse_messages([{"role": "user", "name": "ann", "interrupted": True,
                            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
                           {"role": "assistant", "content": [], "interrupted": True}])
    assert conv.system is None
    assert conv.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("messages, error", [
    ("hello", "messages: expected a list of messages, got a string"),
    ({"role": "user", "content": "hi"}, "messages: expected a list of messages, got an object"),
    ([], "messages: empty; give at least one message"),
    ([{"role": "user", "content": "a"}, "b"],
     'messages[1]: expected an object with "role" and "content", got a string'),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "messages[1].role: expected one of system, user, assistant, got 'tool'"),
    ([{"content": "a"}], "messages[0].role: expected one of system, user, assistant, got null"),
    ([{"role": "user"}], "messages[0].content: expected a string or a list of text parts, got null"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": 7}],
     "messages[2].content: expected a string or a list of text parts, got a number"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     "messages[0].content[1]: expected a text part {\"type\": \"text\", \"text\": ...}, "
     "got a part of type 'image_url'; only text is supported"),
    ([{"role": "user", "content": ["a"]}],
     "messages[0].content[0]: expected a text part {\"type\": \"text\", \"text\": ...}, got a string; "
     "only text is supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text: expected a string, got null"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "messages[1]: a system message is allowed only as the first message"),
], ids=["string", "object", "empty", "item-not-object", "bad-role", "no-role", "no-content", "number-content",
        "image-part", "bare-string-part", "part-without-text", "system-not-first"])
def test_parse_messages_rejects_with_the_offending_index(messages, error):
    with pytest.raises(TinychatError) as e:
        parse_messages(messages)
    assert str(e.value) == error


def test_parse_messages_where_prefixes_the_error():
    with pytest.raises(TinychatError, match=r"^body\.messages\[0\]\.role: "):
        parse_messages([{"role": "bot", "content": "x"}], where="body.messages")


def test_importing_the_session_core_needs_no_terminal_and_no_torch():
    code = ("import sys, tinychat.session; "
            "print(sorted(m for m in ('prompt_toolkit', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
