"""`qopt info`: versions and the bundled files."""
from __future__ import annotations

import argparse

from .. import __version__


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions and the bundled files")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bundled import bundled_model_dir, bundled_tokenizer_dir, wikitext2_test_path

    print(f"qopt {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for label, path in (("bundled model", bundled_model_dir()), ("tokenizer", bundled_tokenizer_dir()),
                        ("WikiText-2 test", wikitext2_test_path())):
        print(f"{label:16s} {path}{'' if path.exists() else '  (missing)'}")
    return 0
