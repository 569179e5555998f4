"""Structured output: JSON (a schema, or any object) enforced by tinychat.grammar's logits processor.

Random logits stand in for a model: whatever they prefer, the processor must let through only valid JSON
that ends with an end-of-sequence token. Tokenizers: a byte-level one (one token per byte), a small BPE
trained here (multi-byte tokens such as '": "'), and the default model's when the model store has it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hostile_inputs import TINY, one_line_error, write_byte_tokenizer, write_model
from tinychat.cli import main
from tinychat.errors import TinychatError
from tinychat.grammar import GrammarError, check_json_schema, compile_json_grammar, json_processor
from tinychat.sampling import RandomSampler, SamplingParams, greedy
from tinychat.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

# Bounded strings, integer and array: a generation from random logits must end within a few hundred tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
EXTRA_ROWS = 7  # the model's vocabulary is larger than the tokenizer's (padded embeddings)
PROMPT = [5, 6, 7]


@pytest.fixture(autouse=True)
def _models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path / "models-store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE trained on a few JSON lines, so '": "', '", "' and words are single tokens."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps({"name": n, "age": a, "color": c, "tags": [n, c]})
              for n, a, c in [("ada", 36, "red"), ("alan", 41, "green"), ("grace", 85, "blue"), ("kurt", 71, "red")]]
    tok.train_from_iterator(corpus * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


@pytest.fixture(scope="module", params=["bytes", "bpe", "smollm2"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "bytes":
        write_byte_tokenizer(path)
    elif request.param == "bpe":
        bpe_tokenizer(path)
    else:
        from tinychat.hub import DEFAULT_MODEL

        path = Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL
        if not (path / "tokenizer.json").is_file():
            pytest.skip("the default model is not in the checkout's model store (models/)")
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token_ids
    return tok


def run(tokenizer: Tokenizer, schema: dict | None, sample, seed: int, bias=None, max_tokens: int = 600):
    """Generate from fresh random logits through the processor: (the tokens before EOS, the EOS id or None)."""
    vocab = tokenizer.vocab_size + EXTRA_ROWS
    processor = json_processor(compile_json_grammar(tokenizer, schema), vocab, tokenizer.eos_token_ids)
    gen = torch.Generator().manual_seed(seed)
    history, out = torch.tensor([PROMPT]), []
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab, generator=gen) * 3
        logits[:, tokenizer.vocab_size:] = 100.0  # the padded rows would win every time if allowed
        if bias is not None:
            logits += bias
        token = int(sample(processor(history, logits))[0])
        assert token < tokenizer.vocab_size
        if token in tokenizer.eos_token_ids:
            return out, token
        out.append(token)
        history = torch.cat([history, torch.tensor([[token]])], dim=1)
    return out, None


SAMPLERS = {"greedy": lambda seed: greedy,
            "random": lambda seed: RandomSampler(SamplingParams(temperature=1.0, seed=seed))}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schema_output_is_valid_json_and_ends_with_eos(tokenizer, sampler, seed):
    tokens, eos = run(tokenizer, SCHEMA, SAMPLERS[sampler](seed), seed)
    text = tokenizer.decode(tokens)
    assert eos is not None, f"no end-of-sequence after {text!r}"
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert value["name"] and value["tags"]  # not an empty document


def test_outputs_differ_with_the_logits(tokenizer):
    # The constraint keeps the logits' choices where it can: different logits, different documents.
    texts = {tokenizer.decode(run(tokenizer, SCHEMA, greedy, seed)[0]) for seed in range(4)}
    assert len(texts) >= 3, texts


def closing_bias(tokenizer: Tokenizer) -> torch.Tensor:
    """+4 on tokens whose text ends a string or object, so 'any object' from random logits ends soon."""
    bias = torch.zeros(tokenizer.vocab_size + EXTRA_ROWS)
    for i in range(tokenizer.vocab_size):
        if tokenizer.decode([i]).endswith(('"', "}")):
            bias[i] = 4.0
    return bias


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_mode_yields_an_object(tokenizer, seed):
    tokens, eos = run(tokenizer, None, RandomSampler(SamplingParams(temperature=1.0, seed=seed)), seed,
                      bias=closing_bias(tokenizer))
    text = tokenizer.decode(tokens)
    assert eos is not None, f"no end-of-sequence after {text!r}"
    assert isinstance(json.loads(text), dict), text


def test_only_eos_after_the_document_and_never_before(tokenizer):
    vocab = tokenizer.vocab_size + EXTRA_ROWS
    eos_ids = [tokenizer.eos_token_ids[0], tokenizer.bos_token_id]  # a second (model-side) end id
    assert len(set(eos_ids)) == 2
    processor = json_processor(compile_json_grammar(tokenizer, SCHEMA), vocab, eos_ids)
    document = tokenizer.encode(json.dumps({"name": "ada", "age": 36, "color": "red", "tags": ["x"]}),
                                add_special_tokens=False)
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    first = processor(torch.tensor([PROMPT]), logits)
    assert first.shape == logits.shape and first.dtype == logits.dtype
    assert torch.isfinite(first[0, document[0]]) and not torch.isfinite(first[0, eos_ids]).any()
    assert not torch.isfinite(first[0, tokenizer.vocab_size:]).any()
    assert torch.equal(first[torch.isfinite(first)], logits[torch.isfinite(first)])  # allowed logits untouched
    assert not processor.done
    for n in range(1, len(document)):  # the history grows a token at a time, as in generate_step
        step = processor(torch.tensor([PROMPT + document[:n]]), logits)
        assert torch.isfinite(step[0, document[n]]), n
        assert not torch.isfinite(step[0, eos_ids]).any(), n
    last = processor(torch.tensor([PROMPT + document]), logits)
    assert processor.done
    assert torch.isfinite(last[0]).nonzero().view(-1).tolist() == sorted(eos_ids)


def test_a_token_the_grammar_rejects_is_an_error(tokenizer):
    processor = json_processor(compile_json_grammar(tokenizer, SCHEMA), tokenizer.vocab_size,
                               tokenizer.eos_token_ids)
    processor(torch.tensor([PROMPT]), torch.randn(1, tokenizer.vocab_size))
    bad = tokenizer.encode("x", add_special_tokens=False)[0]  # a JSON object cannot start with x
    with pytest.raises(TinychatError, match="rejected token"):
        processor(torch.tensor([PROMPT + [bad]]), torch.randn(1, tokenizer.vocab_size))


@pytest.mark.parametrize("schema,words", [
    ({"type": "foo"}, ["foo"]),
    ({"type": "string", "pattern": "("}, ["regex"]),
    ({"not": {"type": "string"}}, ["not"]),
    ({"$ref": "#/definitions/nope"}, ["nope"]),
    ({"type": "string", "minLength": 5, "maxLength": 2}, ["minLength"]),
    ([1, 2], ["list"]),
])
def test_rejected_schema_raises_grammar_error(tokenizer, schema, words):
    for call in (lambda: check_json_schema(schema), lambda: compile_json_grammar(tokenizer, schema)):
        with pytest.raises(GrammarError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in words), message
        assert isinstance(e.value, TinychatError)


def test_engine_tokenizer_is_built_once_per_tokenizer(tokenizer):
    a = compile_json_grammar(tokenizer, SCHEMA)
    b = compile_json_grammar(tokenizer, None)
    assert a._engine_tokenizer is b._engine_tokenizer
    assert a.vocab_size == tokenizer.vocab_size


def test_sentencepiece_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    monkeypatch.setattr(tok, "hf_json", lambda: None)  # what a tokenizer.model-only model answers
    with pytest.raises(GrammarError, match="SentencePiece"):
        compile_json_grammar(tok, SCHEMA)


def test_model_without_eos_is_a_clear_error(tmp_path):
    write_byte_tokenizer(tmp_path)
    grammar = compile_json_grammar(Tokenizer.from_dir(tmp_path), SCHEMA)
    with pytest.raises(GrammarError, match="end-of-sequence"):
        json_processor(grammar, 260, [])


# ----------------------------------------------------------------------------------------------------------
# CLI: tinychat generate --json-schema / --json on a tiny random model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "model", {**TINY, "max_position_embeddings": 512})


def generate(capsys, model: Path, *extra) -> tuple[int, str, str]:
    code = main(["generate", "--model", str(model), "--prompt", "a person", "--temperature", "0",
                 "--max-tokens", "400", *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_schema_prints_valid_json(tiny_model, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = generate(capsys, tiny_model, "--json-schema", schema)
    assert code == 0, err
    assert "[stop]" in err
    jsonschema.validate(json.loads(out), SCHEMA)


def test_cli_json_object(tiny_model, capsys):
    code, out, err = generate(capsys, tiny_model, "--json")
    assert code == 0, err
    assert isinstance(json.loads(out), dict)


def test_cli_incomplete_json_is_a_warning_and_exit_1(tiny_model, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = generate(capsys, tiny_model, "--json-schema", schema, "--max-tokens", "5")
    assert code == 1 and "incomplete" in err and "--max-tokens" in err
    assert out.startswith('{"') and "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "directory", "not_json", "not_object", "rejected"])
def test_cli_bad_schema_file_is_a_one_line_error(tiny_model, tmp_path, capsys, case):
    path = tmp_path / "schema.json"
    if case == "directory":
        path.mkdir()
    elif case == "not_json":
        path.write_text('{"type": "object",')
    elif case == "not_object":
        path.write_text("[1, 2]")
    elif case == "rejected":
        path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "frobnicate"}}}))
    code, out, err = generate(capsys, tiny_model, "--json-schema", path)
    assert code == 2 and out == ""
    line = one_line_error(err, str(path))
    if case == "rejected":
        assert "frobnicate" in line


def test_processor_vocab_mismatch_is_an_error(tokenizer):
    processor = json_processor(compile_json_grammar(tokenizer, None), tokenizer.vocab_size, tokenizer.eos_token_ids)
    with pytest.raises(TinychatError, match="logits"):
        processor(torch.tensor([PROMPT]), torch.randn(1, tokenizer.vocab_size + 1))
