"""Fuzzing the readers of files a user may have been handed: safetensors, GGUF, config.json, and the
streaming detokenizer. Nothing may escape but TinychatError (which the CLI turns into one line, exit 2).

Bounded for CI (max_examples per test, fixed seed): the whole file runs in well under two minutes on two
cores. For a longer, random run: TINYCHAT_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes

from hostile_inputs import TINY, write_byte_tokenizer, write_model, write_tiny_gguf
from tinychat.checkpoint import CheckpointReader
from tinychat.config import ModelConfig
from tinychat.errors import TinychatError

_EXAMPLES = os.environ.get("TINYCHAT_FUZZ_EXAMPLES")


def fuzz(examples: int):
    """Settings for one fuzz test: `examples` cases, reproducible unless TINYCHAT_FUZZ_EXAMPLES is set."""
    return settings(max_examples=int(_EXAMPLES) if _EXAMPLES else examples, derandomize=_EXAMPLES is None,
                    deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


def edits_in(limit: int):
    """Byte edits, most of them inside the first `limit` bytes (the header), some anywhere."""
    pos = st.one_of(st.integers(0, max(limit - 1, 0)), st.integers(0, 1 << 20))
    return st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=8)


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="tinychat-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# safetensors -> CheckpointReader


def _valid_safetensors() -> bytes:
    return save_bytes({"model.norm.weight": torch.arange(8, dtype=torch.float16),
                       "model.embed_tokens.weight": torch.ones(3, 4, dtype=torch.bfloat16),
                       "ids": torch.arange(5, dtype=torch.int32)}, metadata={"format": "pt"})


VALID_ST = _valid_safetensors()
ST_HEADER_END = 8 + struct.unpack("<Q", VALID_ST[:8])[0]


def read_everything(directory: Path) -> None:
    reader = CheckpointReader(directory)
    try:
        for name in list(reader.keys()):
            reader.get(name)
    finally:
        reader.close()


def only_our_error(fn, *args) -> bool:
    """Run fn; True if it succeeded, False if it raised TinychatError; anything else fails the test.
    (`pytest --hypothesis-show-statistics` shows how the cases ended.)"""
    try:
        fn(*args)
    except TinychatError as e:
        assert str(e) and "\n" not in str(e)
        # The message without paths and numbers, so the statistics group alike failures.
        event("refused: " + " ".join(w for w in str(e).split()[1:6] if "/" not in w and not w[:1].isdigit()))
        return False
    event("accepted")
    return True


DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "X", ""]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=8))
tensor_entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(DTYPES), json_scalars),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalars),
    "data_offsets": st.one_of(st.lists(st.integers(-5, 2**40), min_size=0, max_size=3), json_scalars),
})
headers = st.dictionaries(st.text(max_size=12), st.one_of(tensor_entries, json_scalars), max_size=4)


@st.composite
def safetensors_files(draw):
    kind = draw(st.sampled_from(["random", "mutated", "header"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "mutated":
        edits = draw(edits_in(ST_HEADER_END))
        cut = draw(st.one_of(st.none(), st.integers(0, len(VALID_ST))))
        return mutate(VALID_ST, edits, cut)
    header = json.dumps(draw(headers)).encode()
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))


@fuzz(500)
@given(data=safetensors_files())
def test_fuzz_safetensors_reader(data, scratch):
    (scratch / "model.safetensors").write_bytes(data)
    only_our_error(read_everything, scratch)


@fuzz(100)
@given(index=st.one_of(st.binary(max_size=64), st.builds(json.dumps, st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                          st.dictionaries(st.sampled_from(["weight_map", "a", ""]), inner,
                                                          max_size=3)), max_leaves=8)).map(str.encode)))
def test_fuzz_safetensors_index(index, scratch):
    (scratch / "model.safetensors").write_bytes(VALID_ST)
    (scratch / "model.safetensors.index.json").write_bytes(index)
    only_our_error(read_everything, scratch)


# ----------------------------------------------------------------------------------------------------------
# GGUF -> import_gguf (and the directory it writes -> tokenizer + model load)


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> tuple[bytes, int]:
    import gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


def import_and_load(gguf_path: Path, out_dir: Path) -> None:
    from tinychat.gguf_import import import_gguf
    from tinychat.loader import load_model
    from tinychat.tokenizer import Tokenizer

    import_gguf(gguf_path, out_dir, progress=False)
    tokenizer = Tokenizer.from_dir(out_dir)
    tokenizer.decode(tokenizer.encode("the cat", add_special_tokens=True))
    load_model(out_dir)


@fuzz(300)
@given(data=st.data())
def test_fuzz_gguf_import(data, valid_gguf, scratch):
    raw, data_offset = valid_gguf
    mutated = mutate(raw, data.draw(edits_in(data_offset), label="edits"),
                     data.draw(st.one_of(st.none(), st.integers(0, len(raw))), label="cut"))
    gguf_path, out_dir = scratch / "model.gguf", scratch / "out" / "model"
    gguf_path.write_bytes(mutated)
    if not only_our_error(import_and_load, gguf_path, out_dir):
        # A failed import leaves nothing behind (a failure after it, in loading, leaves the whole model).
        leftovers = list((scratch / "out").iterdir()) if (scratch / "out").exists() else []
        assert leftovers in ([], [out_dir]), leftovers
    shutil.rmtree(scratch / "out", ignore_errors=True)


def _gguf_values():
    from gguf import GGUFValueType as T

    return st.one_of(
        st.tuples(st.integers(0, 2**32 - 1), st.just(T.UINT32)),
        st.tuples(st.integers(-2**31, 2**31 - 1), st.just(T.INT32)),
        st.tuples(st.integers(0, 2**64 - 1), st.just(T.UINT64)),
        st.tuples(st.floats(width=32), st.just(T.FLOAT32)),
        st.tuples(st.booleans(), st.just(T.BOOL)),
        st.tuples(st.text(max_size=16), st.just(T.STRING)),
        st.tuples(st.lists(st.text(max_size=6), max_size=6), st.just(T.ARRAY), st.just(T.STRING)),
        st.tuples(st.lists(st.integers(-2**31, 2**31 - 1), max_size=6), st.just(T.ARRAY), st.just(T.INT32)),
        st.tuples(st.lists(st.floats(width=32), max_size=4), st.just(T.ARRAY), st.just(T.FLOAT32)),
    )


def _edit_tensor(tensors: dict, name: str, how: str) -> None:
    import numpy as np

    t = tensors[name]
    if how == "drop":
        del tensors[name]
    elif how == "transpose" and t.ndim == 2:
        tensors[name] = np.ascontiguousarray(t.T)
    elif how == "cut":
        tensors[name] = np.ascontiguousarray(t[: max(1, t.shape[0] // 2)])
    elif how == "f16":
        tensors[name] = t.astype(np.float16)
    elif how == "nan":
        t = t.copy()
        t.flat[0] = np.nan
        tensors[name] = t
    elif how == "huge":
        tensors[name] = np.full_like(t, 1e30)
    elif how == "unknown_name":
        tensors["blk.0.mystery.weight"] = t


@fuzz(250)
@given(data=st.data())
def test_fuzz_gguf_typed_metadata_and_tensors(data, scratch):
    """Well-formed GGUF files with wrong contents: keys dropped or given other types and values, tensors
    dropped, reshaped, retyped or poisoned."""
    from hostile_inputs import gguf_metadata, gguf_tensors

    meta, tensors = gguf_metadata(), gguf_tensors()
    for key in data.draw(st.lists(st.sampled_from(sorted(meta)), max_size=3, unique=True), label="keys"):
        if data.draw(st.booleans(), label=f"drop {key}"):
            del meta[key]
        else:
            meta[key] = data.draw(_gguf_values(), label=key)
    how = data.draw(st.sampled_from(["none", "drop", "transpose", "cut", "f16", "nan", "huge", "unknown_name"]),
                    label="tensor edit")
    _edit_tensor(tensors, data.draw(st.sampled_from(sorted(tensors)), label="tensor"), how)
    arch = data.draw(st.sampled_from(["llama", "llama", "llama", "mistral", ""]), label="arch")
    gguf_path, out_dir = scratch / "model.gguf", scratch / "out" / "model"
    try:
        write_tiny_gguf(gguf_path, meta, tensors, arch=arch)
    except Exception:  # values the gguf writer itself refuses make no file to test
        reject()
    if not only_our_error(import_and_load, gguf_path, out_dir):
        leftovers = list((scratch / "out").iterdir()) if (scratch / "out").exists() else []
        assert leftovers in ([], [out_dir]), leftovers
    shutil.rmtree(scratch / "out", ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig.from_dict


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
FIELDS = [f for f in ModelConfig.__dataclass_fields__ if f != "extra"] + ["use_sliding_window"]
rope_dicts = st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings", "rope_theta"]),
                             st.one_of(st.sampled_from(["linear", "llama3", "default", "yarn"]), json_values),
                             max_size=5)


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["random", "edited"]))
    if kind == "random":
        keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
        return draw(st.one_of(json_values, st.dictionaries(keys, json_values, max_size=12)))
    cfg = dict(TINY)
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4)):
        cfg[key] = draw(st.one_of(json_values, rope_dicts) if key.startswith("rope_") else json_values)
    return cfg


@fuzz(1000)
@given(cfg=configs())
@example(cfg={**TINY, "rope_scaling": {"rope_type": "linear", "factor": 1e-320}})  # inf frequencies
@example(cfg={**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                                        "low_freq_factor": 1e-320, "high_freq_factor": 1e-300}})
@example(cfg={**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}})
def test_fuzz_config(cfg):
    from tinychat.models import hf_shapes
    from tinychat.models.llama import rope_inv_freq

    try:
        config = ModelConfig.from_dict(cfg)
    except TinychatError as e:
        assert str(e).startswith("config.json:") and "\n" not in str(e)
        return
    # What passed validation is usable by the code that consumes the raw values.
    assert config.head_dim % 2 == 0 and config.num_attention_heads % config.num_key_value_heads == 0
    if config.num_hidden_layers <= 64:
        hf_shapes(config)
    if config.head_dim <= 1024:
        assert torch.isfinite(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)).all()
    assert math.isfinite(config.rms_norm_eps)
    json.dumps(config.to_dict())


@fuzz(150)
@given(text=st.one_of(st.binary(max_size=64), st.builds(json.dumps, json_values).map(str.encode)))
def test_fuzz_config_file(text, scratch):
    (scratch / "config.json").write_bytes(text)
    only_our_error(ModelConfig.from_dir, scratch)


# ----------------------------------------------------------------------------------------------------------
# StreamingDetokenizer: random ids -> no exception, streaming == one-shot decode


CORPUS = ("Hello world! Grüße aus Köln — naïve café. 日本語のテキスト。 emoji 🙂🚀 and  spaces\tand\nnewlines. "
          "numbers 12345 6789, code: def f(x): return x**2  # ok\n") * 4


@pytest.fixture(scope="module")
def tokenizers_under_test(tmp_path_factory):
    """Byte-level BPE with merges across multi-byte characters, SentencePiece with byte fallback, and the
    plain byte tokenizer (whose single bytes split every multi-byte character)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tinychat.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tok")
    found = {}

    bpe_dir = root / "bpe"
    bpe_dir.mkdir()
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tok.save(str(bpe_dir / "tokenizer.json"))
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    found["bpe"] = Tokenizer.from_dir(bpe_dir)

    byte_dir = root / "bytes"
    byte_dir.mkdir()
    write_byte_tokenizer(byte_dir)
    found["bytes"] = Tokenizer.from_dir(byte_dir)

    try:
        import io

        import sentencepiece as spm

        sp_dir = root / "sp"
        sp_dir.mkdir()
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=model,
                                       vocab_size=500, byte_fallback=True, character_coverage=1.0,
                                       model_type="bpe", minloglevel=2, hard_vocab_limit=False)
        (sp_dir / "tokenizer.model").write_bytes(model.getvalue())
        found["sentencepiece"] = Tokenizer.from_dir(sp_dir)
    except ImportError:
        pass
    return found


def _ids(vocab: int):
    return st.lists(st.integers(-3, vocab + 3), max_size=40)


@fuzz(400)
@given(data=st.data())
def test_fuzz_streaming_detokenizer(data, tokenizers_under_test):
    from tinychat.tokenizer import StreamingDetokenizer

    name = data.draw(st.sampled_from(sorted(tokenizers_under_test)), label="tokenizer")
    tokenizer = tokenizers_under_test[name]
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    # Random ids, or the ids of real text (cut anywhere, so multi-byte characters are split).
    ids = data.draw(st.one_of(_ids(tokenizer.vocab_size), st.text(max_size=30).map(
        lambda t: tokenizer.encode(t + CORPUS[:20], add_special_tokens=False))), label="ids")
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=skip)
    streamed = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)
