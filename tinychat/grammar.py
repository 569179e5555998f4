"""Structured output: sampling constrained to JSON (any object, or a JSON Schema) by a logits processor.

The one module that knows the grammar engine (llguidance). compile_json_grammar checks the schema once per
request; json_processor makes the per-generation processor that sampling runs before each token. The
output is compact JSON (", " and ": " separators, no other whitespace), so a model cannot idle in
whitespace forever; a schema may override that through llguidance's "x-guidance" key.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .errors import TinychatError
from .tokenizer import Tokenizer

ANY_OBJECT: dict = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}
_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_engine_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()
_engine_tokenizers_lock = threading.Lock()


class GrammarError(TinychatError):
    """A schema the grammar engine rejects, or a tokenizer it cannot use."""


@dataclass(frozen=True)
class JsonGrammar:
    """A checked JSON grammar for one tokenizer; json_processor makes a fresh matcher from it per generation."""

    schema: dict
    _grammar: str
    _engine_tokenizer: Any

    @property
    def vocab_size(self) -> int:
        """How many token ids the grammar knows (the tokenizer's; a model may have more rows)."""
        return self._engine_tokenizer.vocab_size

    def _matcher(self):
        import llguidance

        return llguidance.LLMatcher(self._engine_tokenizer, self._grammar, log_level=0)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _engine_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of our tokenizer, built once per Tokenizer object (it takes a few hundred ms)."""
    with _engine_tokenizers_lock:
        found = _engine_tokenizers.get(tokenizer)
        if found is None:
            import llguidance

            source = tokenizer.hf_json()
            if source is None:
                raise GrammarError("structured output needs an HF tokenizer.json; this model has only a SentencePiece "
                                   "tokenizer.model (use a model that ships tokenizer.json)")
            try:
                found = llguidance.LLTokenizer(source, eos_token=list(tokenizer.eos_token_ids) or None)
            except Exception as e:
                raise GrammarError(f"the grammar engine cannot use this model's tokenizer ({_one_line(e)}); "
                                   "structured output is not supported for this model") from None
            _engine_tokenizers[tokenizer] = found
        return found


def check_json_schema(schema: dict | None) -> str:
    """Reject (GrammarError) a schema the engine cannot compile, before any tokenizer or model is loaded;
    returns the engine's grammar for it. None means any JSON object."""
    import llguidance

    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}; "
                           'use e.g. {"type": "object", "properties": {...}}')
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"JSON schema rejected: {_one_line(e)}; fix the schema") from None
    _raise_if_invalid(grammar, None)
    return grammar


def _raise_if_invalid(grammar: str, engine_tokenizer) -> None:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, engine_tokenizer)
    if is_error:
        what = _one_line(messages[0]) if messages else "unknown error"
        raise GrammarError(f"JSON schema rejected: {what}; fix the schema (JSON Schema draft 2020-12 is supported "
                           "except if/then/else and not)")


def compile_json_grammar(tokenizer: Tokenizer, schema: dict | None) -> JsonGrammar:
    """The grammar for JSON matching `schema` (None: any JSON object); GrammarError if the engine rejects the
    schema or cannot use the tokenizer."""
    grammar = check_json_schema(schema)
    engine_tokenizer = _engine_tokenizer(tokenizer)
    _raise_if_invalid(grammar, engine_tokenizer)
    return JsonGrammar(ANY_OBJECT if schema is None else schema, grammar, engine_tokenizer)


def json_processor(grammar: JsonGrammar, vocab_size: int, eos_ids: Iterable[int]) -> "JsonProcessor":
    """A logits processor (history_ids [1, seq], logits [1, vocab]) -> logits for one generation."""
    return JsonProcessor(grammar, vocab_size, eos_ids)


class JsonProcessor:
    """Disallowed tokens get -inf. The history seen on the first call is the prompt; each later call first
    advances the matcher by the tokens that came after what it has seen. Once the JSON is complete only the
    end-of-sequence ids remain, so the generation ends; ids past the tokenizer's vocabulary are never allowed."""

    def __init__(self, grammar: JsonGrammar, vocab_size: int, eos_ids: Iterable[int]):
        self.eos_ids = sorted({int(i) for i in eos_ids if 0 <= int(i) < vocab_size})
        if not self.eos_ids:
            raise GrammarError("structured output needs the model's end-of-sequence token id (none is known); "
                               "set eos_token_id in the model's generation_config.json")
        self.vocab_size = vocab_size
        # The engine's own end-of-sequence ids are masked like any other token; ours decide the end.
        self._engine_eos = [i for i in grammar._engine_tokenizer.eos_tokens if 0 <= i < vocab_size]
        self._matcher = grammar._matcher()
        if self._matcher.is_error():
            raise GrammarError(f"JSON schema rejected: {_one_line(self._matcher.get_error())}; fix the schema")
        self._seen: int | None = None

    @property
    def done(self) -> bool:
        """The JSON is complete: nothing but an end-of-sequence token may follow."""
        return self._matcher.is_stopped()

    def __call__(self, history_ids: Tensor, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise TinychatError(f"the JSON processor was made for {self.vocab_size} logits, got {logits.shape[-1]}")
        seq = history_ids.shape[-1]
        if self._seen is None:
            self._seen = seq
        elif seq > self._seen:
            for token in history_ids[0, self._seen:].tolist():
                self._advance(token)
            self._seen = seq
        blocked = torch.from_numpy(~self._allowed()).to(logits.device)
        return logits.masked_fill(blocked, -math.inf)

    def _advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise TinychatError(f"the JSON grammar rejected token {token} ({_one_line(self._matcher.get_error())}); "
                                "this is a bug in tinychat, please report it")

    def _allowed(self) -> np.ndarray:
        allowed = np.zeros(self.vocab_size, dtype=bool)
        if self._matcher.is_stopped():
            allowed[self.eos_ids] = True
            return allowed
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        if self._matcher.is_error():
            raise TinychatError(f"the JSON grammar failed ({_one_line(self._matcher.get_error())}); "
                                "simplify the schema")
        bits = np.unpackbits(words, bitorder="little").view(bool)
        n = min(bits.size, self.vocab_size)
        allowed[:n] = bits[:n]
        # End-of-sequence is ours to decide (the model's ids, not the engine's idea of EOS): only once the
        # JSON is complete.
        allowed[self._engine_eos] = False
        allowed[self.eos_ids] = self._matcher.is_accepting()
        if not allowed.any():
            raise TinychatError("the JSON grammar allows no token here; this is a bug in tinychat, please report it")
        return allowed
