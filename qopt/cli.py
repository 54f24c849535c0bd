"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library modules.

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets `handler`;
`main` prints any `QoptError` (or bad-argument `ValueError`) as one line and exits 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import QoptError

DEFAULT_MODEL_HELP = "checkpoint folder (default: the bundled model)"


def _model_path(path: str | None) -> str:
    """The MODEL argument; none means the model that ships with qopt."""
    from .bundled import bundled_model_dir

    return path if path else str(bundled_model_dir())


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions and the bundled files")
    p.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> int:
    import torch

    from .bundled import bundled_model_dir, bundled_tokenizer_dir, wikitext2_test_path

    print(f"qopt {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for label, path in (("bundled model", bundled_model_dir()), ("tokenizer", bundled_tokenizer_dir()),
                        ("WikiText-2 test", wikitext2_test_path())):
        print(f"{label:16s} {path}{'' if path.exists() else '  (missing)'}")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qopt", description="OPT language models in low-bit precision.")
    parser.add_argument("--version", action="version", version=f"qopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
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


if __name__ == "__main__":
    sys.exit(main())
