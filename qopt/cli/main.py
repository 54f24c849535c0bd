"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library.

Each subcommand is a module here with `add(subparsers)`, which declares its arguments and sets `handler`;
`COMMANDS` lists them once, in the order `qopt --help` shows them. The exit status is a contract CI scripts rely
on (`EXIT_STATUSES`): every expected failure (a `QoptError`, a bad argument, a missing or unwritable file, a
device that does not exist) prints as one line and exits 2, an unexpected exception as one line and 3, and `-v`
adds the traceback without changing the status; a closed pipe (`qopt ... | head`) ends quietly.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import OptionError, QoptError

COMMANDS = ("info", "eval", "finetune", "merge", "plan", "quantize", "generate", "check")
_MODULES = {"eval": "evaluate"}  # command -> module where the names differ


# the exit statuses, for `qopt --help` and the README: a CI job can tell a regression from a broken setup
EXIT_STATUSES = ((0, "success"), (1, "a regression (eval --check), a failed rule (check) or a plan that cannot "
                                    "load (plan)"),
                 (2, "a usage or input error, or a baseline that is not comparable"),
                 (3, "an internal error (a bug in qopt or a library: rerun with -v for the traceback)"),
                 (130, "interrupted (Ctrl-C)"))
VERSION_LIBRARIES = ("torch", "bitsandbytes", "accelerate", "huggingface_hub")  # what a bug report needs


class _VersionAction(argparse.Action):
    """`qopt --version`: qopt's version and those of the libraries it drives, read from package metadata
    (no import: it answers in a tenth of a second)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    from importlib import metadata

    parts = [f"qopt {__version__}"]
    for name in VERSION_LIBRARIES:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options anywhere after the command, between positionals too
    (`qopt generate DIR --bits 4 "prompt"`), as `parse_intermixed_args` does."""

    _parsing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._parsing:  # parse_known_intermixed_args calls back in here for its two passes
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_STATUSES)
    parser = argparse.ArgumentParser(prog="qopt", description="OPT language models in low-bit precision.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of qopt, torch, bitsandbytes, accelerate and huggingface_hub")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show tracebacks and library logs (the exit status stays the same)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)
    for command in COMMANDS:
        importlib.import_module(f"{__package__}.{_MODULES.get(command, command)}").add(sub)
    return parser


# library argument -> flag, for every command (a command's own API_FLAGS come first). A name with an underscore
# is a Python identifier wherever it appears, so its bare form is replaced too; a keyword with a value
# (`offload_folder=`, `top_p=2.0`, `revision='x'`) always is.
COMMON_FLAGS = {"offload_folder": "--offload-folder", "max_memory": "--max-memory", "device_map": "--device-map",
                "stream_from_host": "--stream-from-host", "revision": "--revision",
                "keep_download=False": "--no-keep-download", "overwrite=True": "--force",
                "check_base=False": "--ignore-base", "resume=False": "--no-resume",
                "max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams", "top_p": "--top-p",
                "top_k": "--top-k", "temperature": "--temperature", "repetition_penalty": "--repetition-penalty",
                "do_sample=True": "--do-sample", "torch_dtype": "--dtype", "quantization": "--quantization",
                "fp16=True": "--fp16", "bf16=True": "--bf16"}
# whole phrases where a message already names the flag beside the keyword, or names a Python-only remedy
_PHRASES = ((re.compile(r"\b\w+='(\w+)' / (--[\w-]+ \1)"), r"\2"),
            (re.compile(r"\bkeep_download=False \((--no-keep-download)\)"), r"\1"),
            (re.compile(r"HF_HUB_CACHE / cache_dir="), "HF_HUB_CACHE"),
            (re.compile(r"device_map=\{'': \d+\} \(the local rank; (--device-map cuda:\d+)\)"), r"\1 (the local rank)"),
            (re.compile(r"\bgenerate\(\): "), ""))
_BEFORE = r"(?<![\w./-])"


def _spell(message: str, name: str, flag: str) -> str:
    if "=" in name:  # a keyword with its value: overwrite=True -> --force
        return re.sub(rf"{_BEFORE}{re.escape(name)}(?![\w.])", flag, message)
    message = re.sub(rf"{_BEFORE}{re.escape(name)}=(True\b)?('[^']*'|[^\s;,)]*)",
                     lambda m: flag + (f" {m.group(2).strip(chr(39))}" if m.group(2) else ""), message)
    return re.sub(rf"{_BEFORE}{re.escape(name)}(?![\w=])", flag, message) if "_" in name else message


def cli_words(err: Exception, message: str, handler: Callable[..., Any]) -> str:
    """The library names its Python arguments (`max_windows`, `resume=False`); a command-line user needs the
    flag. Each command module maps its own in `API_FLAGS`, `COMMON_FLAGS` those of every command; an
    `OptionError` names its remedy exactly."""
    own = getattr(sys.modules[handler.__module__], "API_FLAGS", {})
    flags = {**COMMON_FLAGS, **own}
    if isinstance(err, OptionError) and err.option in flags:
        message = str(err.spelled(flags[err.option]))
    for pattern, replacement in _PHRASES:
        message = pattern.sub(replacement, message)
    for name in sorted(flags, key=len, reverse=True):
        message = _spell(message, name, flags[name])
    return message


class _FlagWords(logging.Filter):
    """Library log notices (an adapter applied to a renamed base, fp16 on a CPU) in the command's flag words."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = cli_words(Exception(), record.getMessage(), self.handler), ()
        return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    words = _FlagWords(args.handler)  # library notices name flags too
    for log_handler in logging.getLogger().handlers:
        log_handler.addFilter(words)
    try:
        return _run(args, verbose)
    finally:
        for log_handler in logging.getLogger().handlers:
            log_handler.removeFilter(words)


def _run(args: argparse.Namespace, verbose: bool) -> int:
    """The command's handler, with every outcome mapped to its exit status (`EXIT_STATUSES`)."""
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say to anyone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (QoptError, ValueError, OSError) as err:
        if verbose:
            traceback.print_exc()
        message = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror or err}"
        print(f"qopt {args.command}: error: {cli_words(err, message, args.handler)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line and its own status, never mistaken for a regression (1)
        if verbose:
            traceback.print_exc()
        message = " ".join(str(err).split())[:300] or "(no message)"
        print(f"qopt {args.command}: internal error: {type(err).__name__}: {cli_words(err, message, args.handler)}"
              + ("" if verbose else " (run with -v for the traceback)"), file=sys.stderr)
        return 3
