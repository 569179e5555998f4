"""`tinychat` command line: one subcommand per front-end module, each registering itself."""

from __future__ import annotations

import argparse
import sys

from .errors import TinychatError

# Each module exposes register(subparsers) that adds its subcommand and sets `func` on the parser.
# Imports stay inside main() so `import tinychat.cli` is cheap and never needs a GPU.
COMMAND_MODULES = ("chat", "quantize_cmd", "evaluate", "bench", "plan")


def register_generate(subparsers) -> None:
    from .args import add_model_args, add_sampling_args

    p = subparsers.add_parser("generate", help="generate a reply to one prompt, streamed to stdout")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat-template)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache length (default: model context)")
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
    engine = load_engine_from_args(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    ids = engine.encode_chat(messages, use_template=not args.no_chat_template)
    cache = engine.model.make_cache(args.max_context)
    cache.check_room(len(ids))
    response = None
    for response in stream_generate(engine.model, engine.tokenizer, ids, params, cache, args.stop,
                                    decoder=engine.decoder):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{response.finish_reason}] {response.stats.summary()}", file=sys.stderr)
    return 0


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
