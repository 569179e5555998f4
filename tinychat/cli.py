"""`tinychat` command line: one subcommand per front-end module, each registering itself."""

from __future__ import annotations

import argparse
import sys

from .errors import TinychatError

# Each module exposes register(subparsers) that adds its subcommand and sets `func` on the parser.
# Imports stay inside main() so `import tinychat.cli` is cheap and never needs a GPU.
COMMAND_MODULES = ("generate", "chat", "quantize", "evaluate", "bench", "plan")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="tinychat", description="Local chat with 4-bit AWQ language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tinychat.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tinychat.{name}":
                continue  # front end not built yet
            raise
        module.register(subparsers)
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
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ntinychat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
