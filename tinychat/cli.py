"""`tinychat` command line: one subcommand per front-end module, each registering itself."""

from __future__ import annotations

import argparse
import sys

from .errors import TinychatError

# Each module exposes register(subparsers) that adds its subcommand and sets `func` on the parser.
# Imports stay inside main() so `import tinychat.cli` is cheap and never needs a GPU.
COMMAND_MODULES = ("chat", "server", "quantize_cmd", "evaluate", "bench", "plan")


def register_generate(subparsers) -> None:
    from .args import add_model_args, add_sampling_args

    p = subparsers.add_parser("generate", help="generate a reply to one prompt, streamed to stdout")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat-template)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length (default: the prompt plus --max-tokens, at most the model's context)")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE", default=None,
                            help="constrain the reply to JSON matching this JSON Schema file")
    structured.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from .args import sampling_from_args
    from .engine import load_engine_from_args
    from .generate import stream_generate

    params = sampling_from_args(args)
    if args.max_context is not None and args.max_context < 1:
        raise TinychatError(f"--max-context must be a positive number of tokens, got {args.max_context}")
    schema = read_json_schema(args.json_schema) if args.json_schema else None
    engine = load_engine_from_args(args)
    processors = []
    if args.json_schema or args.json:
        from .grammar import compile_json_grammar, json_processor

        grammar = compile_json_grammar(engine.tokenizer, schema)
        eos = set(engine.tokenizer.eos_token_ids) | set(engine.model.config.eos_token_ids)
        processors.append(json_processor(grammar, engine.model.config.vocab_size, eos))
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    ids = engine.encode_chat(messages, use_template=not args.no_chat_template)
    cache = engine.model.make_cache(args.max_context or reply_context(engine.model, len(ids), params.max_tokens))
    cache.check_room(len(ids))
    response, reply = None, []
    for response in stream_generate(engine.model, engine.tokenizer, ids, params, cache, args.stop,
                                    decoder=engine.decoder, processors=processors):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        reply.append(response.text)
    sys.stdout.write("\n")
    print(f"[{response.finish_reason}] {response.stats.summary()}", file=sys.stderr)
    if processors and not _is_json("".join(reply)):
        print("tinychat: warning: the JSON is incomplete (the reply hit --max-tokens, the context or a stop "
              "string); raise --max-tokens", file=sys.stderr)
        return 1
    return 0


def reply_context(model, prompt_tokens: int, max_tokens: int) -> int:
    """KV cache length for one reply: the prompt plus --max-tokens, at most the model's default context.
    The cache is zeroed when made, so the model's whole context would be resident for a reply of a few
    tokens (the default model's 8192 positions take more memory than its 4-bit weights)."""
    from .models.llama import DEFAULT_MAX_CONTEXT

    return min(prompt_tokens + max_tokens, model.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def _is_json(text: str) -> bool:
    import json

    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def read_json_schema(path: str) -> dict:
    """The JSON Schema in the file at path, checked by the grammar engine before any model is loaded."""
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinychatError(f"{path}: no such file; give the path of a JSON Schema file to --json-schema") from None
    except IsADirectoryError:
        raise TinychatError(f"{path}: is a directory; give the path of a JSON Schema file to --json-schema") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinychatError(f"{path}: cannot read the JSON Schema ({e}); check the file") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise TinychatError(f"{path}: not valid JSON ({e}); fix the JSON Schema file") from None
    from .grammar import GrammarError, check_json_schema

    try:
        check_json_schema(schema)
    except GrammarError as e:
        raise GrammarError(f"{path}: {e}") from None
    return schema


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="tinychat", description="Local chat with 4-bit AWQ language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_generate(subparsers)
    for name in COMMAND_MODULES:
        importlib.import_module(f"tinychat.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except TinychatError as e:
        if args.debug:
            raise
        print(f"tinychat: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"\ntinychat: {str(e) or 'interrupted'}", file=sys.stderr)  # Interrupted says what was kept
        return 130


if __name__ == "__main__":
    sys.exit(main())
