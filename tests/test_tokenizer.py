"""Tokenizer, chat templates and the streaming detokenizer, against transformers where it can be loaded."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.errors import TinychatError
from tinychat.gguf_import import DEFAULT_GGUF_NAME, find_default_gguf
from tinychat.tokenizer import StreamingDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "12345 apples cost $3.50, i.e. 1,000 cents?",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3))",
    "héllo naïve café — 日本語のテキスト, привет, 你好 🎉👩‍👩‍👧 €",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, trailing   \n",
    "I'm sure they'll say it's fine",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="session")
def smol(smollm_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="session")
def reference(smollm_dir):
    """transformers' tokenizer, read straight from the GGUF when it can (an independent conversion)."""
    transformers = pytest.importorskip("transformers")
    gguf_path = find_default_gguf()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=DEFAULT_GGUF_NAME)
    except Exception:
        return transformers.AutoTokenizer.from_pretrained(str(smollm_dir))


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A tiny SentencePiece model with byte fallback, in a dir holding only tokenizer.model and tokenizer_config.json."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog hello world stream tokens café naïve über straße "
             "résumé 日本語 テキスト привет мир 你好 世界").split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    model = io.BytesIO()
    # character_coverage < 1 drops the rarest characters, so they must go through byte fallback.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.98, minloglevel=2)
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    }))
    return path


@pytest.fixture(scope="session")
def sp(sp_dir) -> Tokenizer:
    return Tokenizer.from_dir(sp_dir)


# ----------------------------------------------------------------------------------------------------------
# Byte-level BPE (the imported default model) against transformers


def test_encode_matches_transformers(smol, reference):
    for text in TEXTS:
        assert smol.encode(text) == reference.encode(text), text
        assert smol.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_digits_are_split_one_by_one(smol):
    assert [smol.decode([i]) for i in smol.encode("12345")] == list("12345")


def test_decode_matches_transformers(smol, reference):
    for text in TEXTS:
        ids = reference.encode(text)
        assert smol.decode(ids) == reference.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smol, reference, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
    assert ours.count("<|im_start|>") == 3 + add_generation_prompt


def test_default_model_special_tokens(smol):
    assert smol.vocab_size == 49152 and smol.has_chat_template
    assert smol.bos_token_id == 1 and smol.eos_token_ids == [2]
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.encode("hi")[0] != smol.bos_token_id  # SmolLM2 does not add BOS
    prompt = smol.apply_chat_template([{"role": "user", "content": "hi"}])
    assert smol.encode(prompt)[:1] == [1] and smol.encode(prompt).count(2) == 2


def test_turn_end_token_of_the_template_counts_as_eos(smollm_dir, tmp_path):
    # A base-model config names <|endoftext|>, but a ChatML template ends turns with <|im_end|>.
    shutil.copy(smollm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [0, 2]


# ----------------------------------------------------------------------------------------------------------
# SentencePiece with byte fallback


def test_sentencepiece_dir_with_only_model_and_config(sp, sp_dir):
    assert sorted(p.name for p in sp_dir.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert sp.bos_token_id == 1 and sp.eos_token_ids == [2] and sp.vocab_size == 400
    text = "hello 🎉 € 日本語 world"
    ids = sp.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1  # LlamaTokenizer convention: BOS by default
    assert sp.decode(ids, skip_special_tokens=True) == text
    assert sp.decode(ids) == "<s>" + text
    assert sp.encode(text, add_special_tokens=False) == ids[1:]


def test_sentencepiece_special_tokens_in_text(sp):
    prompt = sp.apply_chat_template([{"role": "user", "content": "hello"}, {"role": "user", "content": "world"}])
    assert prompt == "<s>[INST] hello [/INST]<s>[INST] world [/INST]"
    ids = sp.encode(prompt)
    assert ids.count(sp.bos_token_id) == 2 and ids[0] == sp.bos_token_id  # no extra BOS before the template's
    assert sp.encode("done</s>", add_special_tokens=False)[-1] == 2


def test_template_raise_exception_is_a_tinychat_error(sp):
    with pytest.raises(TinychatError, match="System role not supported"):
        sp.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_is_sandboxed(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": evil}))
    with pytest.raises(TinychatError, match="chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template and tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    with pytest.raises(TinychatError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(TinychatError, match="no such model directory"):
        Tokenizer.from_dir(tmp_path / "absent")
    with pytest.raises(TinychatError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinychatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_config(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TinychatError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Streaming detokenizer


def stream(tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)
    deltas = []
    for n, token_id in enumerate(ids, 1):
        deltas.append(detok.add_token(token_id))
        # What has been shown is always the start of what these tokens decode to.
        assert tokenizer.decode(ids[:n]).startswith("".join(deltas))
    deltas.append(detok.finalize())
    return deltas


def assert_streams_like_decode(tokenizer, ids: list[int]) -> None:
    deltas = stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    pos = 0
    for delta in deltas:
        for offset, ch in enumerate(delta):
            assert ch != "\ufffd" or full[pos + offset] == "\ufffd"
        pos += len(delta)


def interesting_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that stress the detokenizer: pieces of multi-byte characters, specials, and real text."""
    partial = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])]
    text_ids = [i for text in TEXTS for i in tokenizer.encode(text)]
    return sorted(set(partial) | set(text_ids) | set(tokenizer.special_token_ids))


@pytest.fixture(scope="session")
def smol_ids(smol) -> list[int]:
    return interesting_ids(smol)


@pytest.fixture(scope="session")
def sp_ids(sp) -> list[int]:
    return interesting_ids(sp)


def token_lists(tokenizer: Tokenizer, ids: list[int]):
    return st.lists(st.one_of(st.sampled_from(ids), st.integers(0, tokenizer.vocab_size - 1)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_byte_level_bpe(smol, smol_ids, data):
    assert_streams_like_decode(smol, data.draw(token_lists(smol, smol_ids)))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_sentencepiece_byte_fallback(sp, sp_ids, data):
    assert_streams_like_decode(sp, data.draw(token_lists(sp, sp_ids)))


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_real_text(smol, sp, text):
    for tok in (smol, sp):
        deltas = stream(tok, tok.encode(text))
        assert "".join(deltas) == tok.decode(tok.encode(text))
        assert not any("\ufffd" in d for d in deltas)


def test_stream_shows_each_word_at_once(smol, sp):
    for tok in (smol, sp):
        ids = tok.encode("the quick brown fox jumps over the lazy dog", add_special_tokens=False)
        assert all(stream(tok, ids)[:-1])
    assert stream(sp, sp.encode("hello world", add_special_tokens=False))[1] == " world"


def test_stream_holds_back_partial_characters(smol):
    ids = smol.encode("🎉")
    assert len(ids) > 1
    detok = StreamingDetokenizer(smol)
    assert [detok.add_token(i) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]
    detok.add_token(ids[0])
    assert detok.finalize() == smol.decode(ids[:1]) == "\ufffd"  # a dangling piece is flushed at the end


def test_stream_reset_and_skip_special(smol):
    detok = StreamingDetokenizer(smol, skip_special_tokens=True)
    detok.add_token(smol.encode("🎉")[0])
    detok.reset()
    ids = smol.encode("<|im_start|>hi<|im_end|>")
    assert "".join(detok.add_token(i) for i in ids) + detok.finalize() == "hi"


class CountingTokenizer:
    """Decodes id n to chr(97 + n % 26) and records how many ids each decode call saw."""

    special_token_ids = frozenset()

    def __init__(self):
        self.lengths: list[int] = []

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 97 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)


def test_stream_work_per_token_is_bounded():
    tok = CountingTokenizer()
    detok = StreamingDetokenizer(tok)
    text = "".join(detok.add_token(i) for i in range(2000)) + detok.finalize()
    assert text == tok.decode(range(2000))
    assert max(tok.lengths[:-1]) <= 3  # the anchor, the previous token (context) and the new one


def test_stream_keeps_spaces_of_a_window_cut_mid_run(sp):
    # SentencePiece drops a run's leading space: decode(["▁", "▁"]) is "" although "#▁▁" is "#  ", so a
    # window starting at "▁" must decode as the middle of the run it was cut from (hypothesis found this).
    space, hash_mark = sp.token_to_id("▁"), sp.token_to_id("<0x23>")
    ids = [hash_mark, space, space, space]
    assert sp.decode(ids) == "#   "
    assert stream(sp, ids) == ["#", " ", " ", " ", ""]
