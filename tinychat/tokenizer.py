"""Tokenizer (HF `tokenizers` or SentencePiece), chat templates (jinja2), and a streaming detokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import TinychatError

# Tokens that end a turn in common chat templates. When a template uses one and it is a special token,
# generation must stop there even if the configs only list the base model's end-of-text token.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


# ----------------------------------------------------------------------------------------------------------
# Backends: the same small interface over `tokenizers` and `sentencepiece`


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TinychatError(f"{path}: cannot load tokenizer ({e}); re-download the model's tokenizer files") from None
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        # tokenizer.json names no BOS/EOS; they come from the config files.
        self.bos_id = self.eos_id = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self._tok.to_str()


class _SentencePieceBackend:
    """SentencePiece with control tokens (<s>, </s>, ...) recognised in text and shown when decoding,
    as HF's slow tokenizers do; plain sentencepiece would encode "<s>" as characters and decode it to ''."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:
            raise TinychatError(f"{path}: cannot load SentencePiece model ({e}); re-download tokenizer.model") from None
        n = self._sp.GetPieceSize()
        self.special_ids = {i for i in range(n) if self._sp.IsControl(i)}
        self._special_pieces = {self._sp.IdToPiece(i): i for i in self.special_ids}
        # The model's own BOS/EOS, used when no config file names them (-1 means none).
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.PieceToId(token)
        # PieceToId answers unk for unknown pieces; only a real unk piece may map to it.
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            return None
        return token_id

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for chunk, special_id in self._split_special(text):
            if special_id is not None:
                ids.append(special_id)
            elif chunk:
                ids.extend(self._sp.EncodeAsIds(chunk))
        return ids

    def _split_special(self, text: str) -> Iterable[tuple[str, int | None]]:
        pieces = sorted((p for p in self._special_pieces if p), key=len, reverse=True)
        start = pos = 0
        while pos < len(text):
            match = next((p for p in pieces if text.startswith(p, pos)), None)
            if match is None:
                pos += 1
                continue
            yield text[start:pos], None
            yield match, self._special_pieces[match]
            start = pos = pos + len(match)
        yield text[start:], None

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id not in self.special_ids:
                run.append(token_id)
                continue
            if run:
                parts.append(self._sp.DecodeIds(run))
                run = []
            if not skip_special_tokens:
                parts.append(self._sp.IdToPiece(token_id))
        if run:
            parts.append(self._sp.DecodeIds(run))
        return "".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Config files


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinychatError(f"{path}: not valid JSON ({e}); re-download the model's tokenizer files") from None
    if not isinstance(data, dict):
        raise TinychatError(f"{path}: expected a JSON object; re-download the model's tokenizer files")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _load_chat_template(path: Path, tok_config: dict) -> str | None:
    """The template from chat_template.jinja / chat_template.json (newer transformers) or tokenizer_config."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinychatError(f"{jinja_file}: cannot read the chat template ({e}); re-download it") from None
    template = _read_json(path / "chat_template.json").get("chat_template") or tok_config.get("chat_template")
    if isinstance(template, list):
        # Named templates (e.g. "default", "tool_use"): plain chat wants the default one.
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    return template if isinstance(template, str) and template else None


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Text <-> token ids for one model directory, plus its chat template."""

    def __init__(self, backend, *, bos_token: str | None, eos_token: str | None, add_bos_token: bool,
                 eos_ids: list[int], bos_id: int | None, chat_template: str | None):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = bos_id
        self.eos_token_ids = eos_ids
        self.chat_template = chat_template
        self._compiled_template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise TinychatError(f"{path}: no such model directory; give a directory holding the tokenizer files")
        if (path / "tokenizer.json").is_file():
            backend = _HFBackend(path / "tokenizer.json")
            default_add_bos = False  # tokenizer.json's post-processor already adds what the model wants
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(path / "tokenizer.model")
            default_add_bos = True  # the LlamaTokenizer convention for SentencePiece models
        else:
            raise TinychatError(f"{path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files there")

        tok_config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")
        bos_token = _token_content(tok_config.get("bos_token"))
        eos_token = _token_content(tok_config.get("eos_token"))
        chat_template = _load_chat_template(path, tok_config)

        bos_id = _find_bos_id(backend, bos_token, gen_config, model_config)
        if bos_token is None and bos_id is not None:
            bos_token = _id_to_special_token(backend, bos_id)
        eos_ids = _collect_eos_ids(backend, eos_token, gen_config, model_config, chat_template)
        if eos_token is None and eos_ids:
            eos_token = _id_to_special_token(backend, eos_ids[0])
        add_bos = bool(tok_config.get("add_bos_token", default_add_bos))
        return cls(backend, bos_token=bos_token, eos_token=eos_token, add_bos_token=add_bos,
                   eos_ids=eos_ids, bos_id=bos_id, chat_template=chat_template)

    # -- ids ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._backend.special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def hf_json(self) -> str | None:
        """This tokenizer as HF `tokenizers` JSON (tokenizer.json text), or None for a SentencePiece model:
        grammar engines build their token tables from it."""
        to_json = getattr(self._backend, "to_json", None)
        return to_json() if to_json is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special-token strings in it (e.g. from a chat template) become their ids.
        BOS is added only when the model's tokenizer files ask for it, and never twice."""
        ids = list(self._backend.encode(text, add_special_tokens))
        wants_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        if wants_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Models often pad the embedding past the vocabulary; ids from those rows have no text.
        vocab_size = self.vocab_size
        ids = [i for i in map(int, ids) if 0 <= i < vocab_size]
        return self._backend.decode(ids, skip_special_tokens)

    # -- chat template -----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation, rendered like transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise TinychatError("this model has no chat template; use a raw prompt or a chat (instruct) model")
        template = self._template()
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except TinychatError:
            raise
        except Exception as e:
            raise TinychatError(f"the model's chat template failed on these messages: {type(e).__name__}: {e}; "
                                "fix chat_template in the model's tokenizer files (`generate --no-chat-template` "
                                "skips it)") from None

    def _template(self):
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template


def _id_to_special_token(backend, token_id: int) -> str | None:
    if token_id not in backend.special_ids:
        return None
    return backend.decode([token_id], skip_special_tokens=False) or None


def _find_bos_id(backend, bos_token: str | None, gen_config: dict, model_config: dict) -> int | None:
    candidates = [backend.token_to_id(bos_token) if bos_token else None]
    candidates += _as_id_list(gen_config.get("bos_token_id")) + _as_id_list(model_config.get("bos_token_id"))
    candidates += _as_id_list(backend.bos_id)
    return next((i for i in candidates if i is not None and 0 <= i < backend.vocab_size), None)


def _collect_eos_ids(backend, eos_token: str | None, gen_config: dict, model_config: dict,
                     chat_template: str | None) -> list[int]:
    candidates = _as_id_list(gen_config.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))
    if eos_token is not None:
        candidates.append(backend.token_to_id(eos_token))
    candidates += _as_id_list(backend.eos_id)
    for token in _TURN_END_TOKENS:
        token_id = backend.token_to_id(token)
        if chat_template and token in chat_template and token_id in backend.special_ids:
            candidates.append(token_id)
    ids: list[int] = []
    for token_id in candidates:
        if token_id is not None and 0 <= token_id < backend.vocab_size and token_id not in ids:
            ids.append(token_id)
    return ids


def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TinychatError(f"the model's chat template rejected the conversation: {message} "
                            "(change the messages; `generate --no-chat-template` skips the template)")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Templates print tool schemas with tojson; jinja's own escapes HTML, which a prompt must not have.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TinychatError(f"the model's chat template is not valid jinja ({e}); fix chat_template in tokenizer_config.json") from None


# ----------------------------------------------------------------------------------------------------------
# Streaming detokenizer


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals tokenizer.decode(all ids).

    Each step decodes only a short window: the tokens of the previous delta (context that fixes
    SentencePiece's leading-space handling and BPE byte merging) plus the tokens not yet shown. A delta
    is held back while the window's text ends in U+FFFD, i.e. a multi-byte character is still incomplete.

    SentencePiece (and HF's Metaspace decoder) drop the leading space of a run of text that starts the
    sequence or follows a special token, so a window cut from the middle of a run would lose spaces the
    full decode keeps (context "▁" decodes to "", "▁▁" to "", yet "#▁▁" to "#  "). Such windows are decoded
    behind an anchor token (a plain "a") whose text is then cut off, so they decode as they do in the run.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._specials = tokenizer.special_token_ids
        self._anchor, self._anchor_text = self._find_anchor(tokenizer)
        self.reset()

    @staticmethod
    def _find_anchor(tokenizer) -> tuple[list[int], str]:
        ids = tokenizer.encode("a", add_special_tokens=False)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return (ids, text) if text.strip() else ([], "")

    def reset(self) -> None:
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context tokens (already shown)
        self._read_offset = 0  # start of the tokens not yet shown
        self._mid_run = False  # the window's first token continues a run of text (the token before is not special)

    def add_token(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        shown, text = self._window_texts()
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self._advance()
        return text[len(shown):]

    def finalize(self) -> str:
        """The text still held back (e.g. a dangling partial character); the stream then starts afresh."""
        shown, text = self._window_texts()
        self.reset()
        return text[len(shown):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if not (self._mid_run and self._anchor):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
        text = self._tokenizer.decode(self._anchor + ids, skip_special_tokens=self._skip_special)
        return text[len(self._anchor_text):]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset:]
        return self._decode(window[:self._read_offset - self._prefix_offset]), self._decode(window)

    def _advance(self) -> None:
        # Drop tokens older than the context so memory and work per token stay bounded.
        if self._read_offset:
            self._mid_run = self._ids[self._read_offset - 1] not in self._specials
        self._ids = self._ids[self._read_offset:]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
