"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library.

Each subcommand is a module here with `add(subparsers)`, which declares its arguments and sets `handler`;
`COMMANDS` lists them once, in the order `qopt --help` shows them. `main` prints any `QoptError` (or
bad-argument `ValueError`) as one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import QoptError

COMMANDS = ("info", "eval", "finetune", "plan", "quantize", "generate")
_MODULES = {"eval": "evaluate"}  # command -> module where the names differ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qopt", description="OPT language models in low-bit precision.")
    parser.add_argument("--version", action="version", version=f"qopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        importlib.import_module(f"{__package__}.{_MODULES.get(command, command)}").add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.handler(args) or 0)
    except (QoptError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"qopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qopt {args.command}: interrupted", file=sys.stderr)
        return 130


