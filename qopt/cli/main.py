"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library.

Each subcommand is a module here with `add(subparsers)`, which declares its arguments and sets `handler`;
`COMMANDS` lists them once, in the order `qopt --help` shows them. Every expected failure (a `QoptError`, a bad
argument, a missing or unwritable file, a device that does not exist) prints as one line and exits 2; a closed
pipe (`qopt ... | head`) ends quietly.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import OptionError, QoptError

COMMANDS = ("info", "eval", "finetune", "merge", "plan", "quantize", "generate", "check")
_MODULES = {"eval": "evaluate"}  # command -> module where the names differ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qopt", description="OPT language models in low-bit precision.")
    parser.add_argument("--version", action="version", version=f"qopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        importlib.import_module(f"{__package__}.{_MODULES.get(command, command)}").add(sub)
    return parser


def cli_words(err: Exception, message: str, handler: Callable[..., Any]) -> str:
    """The library names its Python arguments (`max_windows`, `resume=False`); a command-line user needs the
    flag. Each command module maps them in `API_FLAGS`; an `OptionError` names its remedy exactly."""
    flags = getattr(sys.modules[handler.__module__], "API_FLAGS", {})
    if isinstance(err, OptionError) and err.option in flags:
        return str(err.spelled(flags[err.option]))
    for name, flag in flags.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w=])", flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say to anyone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (QoptError, ValueError, OSError) as err:
        if verbose:
            raise
        message = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror or err}"
        print(f"qopt {args.command}: error: {cli_words(err, message, args.handler)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqopt {args.command}: interrupted", file=sys.stderr)
        return 130
