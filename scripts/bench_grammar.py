"""Grammar engines for structured output, measured on the default model's tokenizer: llguidance vs xgrammar.

    python scripts/bench_grammar.py --json bench/grammar-mask.json
    PYTHONPATH=/tmp/xgt python scripts/bench_grammar.py ...   # xgrammar from a throwaway --target install

For each engine: the one-off tokenizer conversion, the grammar compile time (a realistic JSON Schema and
"any JSON object"), and the per-token cost over a full generation of a valid document, fed token by token:
compute the allowed-token bitmask, apply it to a [1, vocab] fp32 logits tensor, and advance by the token.
The first generation on a freshly compiled grammar (cold caches: what one request pays) and the median
of later ones (warm) are both reported. An engine that is not importable is listed as absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinychat.bench import cpu_model  # noqa: E402
from tinychat.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "color": "green",
            "tags": ["mathematics", "poetry", "analytical engine", "notes on the Bernoulli numbers"]}
ANY_OBJECT = {"type": "object"}


def unpack_apply(logits: torch.Tensor, words: torch.Tensor) -> None:
    """The engine-neutral apply (what tinychat.grammar does on the CPU): int32 bitmask words [n] -> -inf on
    every disallowed token, in place."""
    allowed = np.unpackbits(words.numpy().view(np.uint8), bitorder="little").view(bool)
    vocab = logits.shape[-1]
    logits[:, :allowed.size].masked_fill_(torch.from_numpy(~allowed[:vocab]), -math.inf)
    logits[:, allowed.size:] = -math.inf


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, eos: list[int], vocab: int):
        import llguidance
        import llguidance.torch

        self.version = llguidance.__version__
        self.lt, self.convert_s = timed(lambda: llguidance.LLTokenizer(tok.hf_json(), n_vocab=vocab, eos_token=eos))
        self.lg, self.lgt = llguidance, llguidance.torch
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(self, schema):
        grammar = self.lg.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)
        matcher = self.lg.LLMatcher(self.lt, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.lg.LLMatcher(self.lt, grammar, log_level=0)

    def fill(self, m):
        self.lgt.fill_next_token_bitmask(m, self.bitmask)

    def native_apply(self, logits):
        return None  # llguidance.torch's apply is torch.compile'd: no CPU path without a C compiler

    def advance(self, m, token):
        assert m.consume_token(token), m.get_error()

    def done(self, m):
        return m.is_stopped() or m.is_accepting()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, eos: list[int], vocab: int):
        import xgrammar
        from importlib.metadata import version
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        self.version = version("xgrammar")
        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.hf_json()))
        self.info, self.convert_s = timed(lambda: xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab, stop_token_ids=eos))
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        # strict_mode=False: additionalProperties as the schema says (allowed unless false), as llguidance does
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "), strict_mode=False)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bitmask)

    def native_apply(self, logits):
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask, backend="cpu")

    def advance(self, m, token):
        assert m.accept_token(token), f"xgrammar rejected token {token}"

    def done(self, m):
        return m.is_terminated()


def generation(engine, grammar, tokens: list[int], eos: int, vocab: int, base: torch.Tensor) -> dict:
    """One full generation of the document: per step mask + apply + advance, and the final EOS-only mask."""
    m = engine.matcher(grammar)
    mask_s, apply_s, advance_s, native_s, allowed = [], [], [], [], []
    for i, token in enumerate(tokens + [eos]):
        logits = base.clone()
        _, t = timed(lambda: engine.fill(m))
        mask_s.append(t)
        words = engine.bitmask[0]
        _, t = timed(lambda: unpack_apply(logits, words))
        apply_s.append(t)
        assert torch.isfinite(logits[0, token]), f"{engine.name}: step {i}: token {token} disallowed"
        allowed.append(int(torch.isfinite(logits).sum()))
        native = base.clone()
        _, t = timed(lambda: engine.native_apply(native))
        native_s.append(t)
        if token == eos:
            break  # the last step only checks that EOS is allowed once the document is complete
        _, t = timed(lambda: engine.advance(m, token))
        advance_s.append(t)
    advance_s.append(0.0)
    total = [a + b + c for a, b, c in zip(mask_s, apply_s, advance_s)]
    return {"steps": len(total), "total": total, "mask": mask_s, "apply": apply_s, "advance": advance_s,
            "native_apply": native_s, "allowed_last": allowed[-1], "allowed_first": allowed[0]}


def us(xs) -> float:
    return round(statistics.mean(xs) * 1e6, 1)


def variant(k: int) -> tuple[dict, dict]:
    """The schema and document with the property names suffixed by k: a new grammar, so no engine cache
    helps, as for a request that brings its own schema."""
    rename = {name: f"{name}_{k}" for name in SCHEMA["properties"]}
    schema = {**SCHEMA, "properties": {rename[n]: v for n, v in SCHEMA["properties"].items()},
              "required": [rename[n] for n in SCHEMA["required"]]}
    return schema, {rename[n]: v for n, v in DOCUMENT.items()}


def measure(engine, tok: Tokenizer, eos: list[int], vocab: int, repeats: int) -> dict:
    base = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    # Warm-up on another grammar: one-off process costs (allocations, first calls) are not a request's.
    schema, document = variant(-1)
    generation(engine, engine.compile(schema), tok.encode(json.dumps(document), add_special_tokens=False),
               eos[0], vocab, base)
    # A new request: compile a schema never seen before, then its first generation.
    compile_schema, compile_any, cold = [], [], []
    for k in range(repeats):
        schema, document = variant(k)
        grammar, t = timed(lambda: engine.compile(schema))
        compile_schema.append(t)
        compile_any.append(timed(lambda: engine.compile({**ANY_OBJECT, "title": f"any {k}"}))[1])
        cold.append(generation(engine, grammar, tok.encode(json.dumps(document), add_special_tokens=False),
                               eos[0], vocab, base))
    # The same grammar again and again (a server's repeated schema, or the fixed "any object" grammar).
    tokens = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    grammar = engine.compile(SCHEMA)
    warm = [generation(engine, grammar, tokens, eos[0], vocab, base) for _ in range(repeats + 1)][1:]

    def med(runs, key, f=statistics.mean):
        return round(statistics.median(f(r[key]) for r in runs) * 1e6, 1)

    result = {
        "version": engine.version,
        "tokenizer_convert_ms": round(engine.convert_s * 1e3, 1),
        "compile_schema_ms": round(statistics.median(compile_schema) * 1e3, 2),
        "compile_any_object_ms": round(statistics.median(compile_any) * 1e3, 2),
        "document_tokens": len(tokens),
        "steps_per_generation": warm[0]["steps"],
        "cold_per_token_us": med(cold, "total"),
        "cold_mask_us": med(cold, "mask"),
        "cold_max_step_us": med(cold, "total", max),
        "cold_request_overhead_ms": round(statistics.median(
            c + sum(r["total"]) for c, r in zip(compile_schema, cold)) * 1e3, 2),
        "warm_per_token_us": med(warm, "total"),
        "warm_mask_us": med(warm, "mask"),
        "warm_apply_us": med(warm, "apply"),
        "warm_advance_us": med(warm, "advance"),
        "warm_max_step_us": med(warm, "total", max),
        "allowed_tokens_first_step": warm[0]["allowed_first"],
        "allowed_tokens_after_document": warm[0]["allowed_last"],
    }
    if engine.name == "xgrammar":
        result["warm_native_apply_us"] = med(warm, "native_apply")
    return result


def main() -> int:
    from tinychat.hub import DEFAULT_MODEL, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer to use (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=20, help="warm generations per engine")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the apply step")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = Tokenizer.from_dir(resolve_model(args.model))
    vocab, eos = tok.vocab_size, list(tok.eos_token_ids)
    results = {}
    for cls in (LLGuidance, XGrammar):
        try:
            engine = cls(tok, eos, vocab)
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})", file=sys.stderr)
            results[cls.name] = {"absent": str(e)}
            continue
        results[cls.name] = measure(engine, tok, eos, vocab, args.repeats)

    rows = [("tokenizer conversion (ms, once per tokenizer)", "tokenizer_convert_ms"),
            ("compile: schema (ms)", "compile_schema_ms"), ("compile: any JSON object (ms)", "compile_any_object_ms"),
            ("new schema: per token, first generation (us)", "cold_per_token_us"),
            ("  mask (us)", "cold_mask_us"), ("  worst step (us)", "cold_max_step_us"),
            ("  compile + whole generation (ms)", "cold_request_overhead_ms"),
            ("same grammar again: per token (us)", "warm_per_token_us"), ("  mask (us)", "warm_mask_us"),
            ("  apply to logits (us)", "warm_apply_us"), ("  advance (us)", "warm_advance_us"),
            ("  worst step (us)", "warm_max_step_us"),
            ("  xgrammar's own CPU apply (us)", "warm_native_apply_us"),
            ("allowed tokens at step 1", "allowed_tokens_first_step"),
            ("allowed tokens after the document", "allowed_tokens_after_document")]
    names = [n for n in results if "absent" not in results[n]]
    print(f"{'':48s}" + "".join(f"{n + ' ' + results[n]['version']:>20s}" for n in names))
    for label, key in rows:
        print(f"{label:48s}" + "".join(f"{results[n].get(key, '-')!s:>20s}" for n in names))

    if args.json:
        report = {
            "what": "per-token grammar mask cost (bitmask + apply to [1, vocab] fp32 logits + advance) over a "
                    "valid document fed token by token, and compile times",
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{args.threads} torch thread(s)",
            "model": args.model, "vocab": vocab, "eos": eos,
            "schema": SCHEMA, "document": DOCUMENT, "repeats": args.repeats,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0




if __name__ == "__main__":
    sys.exit(main())
