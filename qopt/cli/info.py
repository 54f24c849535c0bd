"""`qopt info`: versions of qopt and the libraries it drives, the CUDA devices, and the bundled files."""
from __future__ import annotations

import argparse
from importlib import metadata

from .. import __version__
from .common import add_parser

LIBRARIES = ("torch", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "huggingface_hub")


def add(sub: argparse._SubParsersAction) -> None:
    add_parser(sub, "info", "versions, CUDA devices and the bundled files").set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bundled import bundled_model_dir, bundled_tokenizer_dir, wikitext2_test_path

    print(f"qopt {__version__}")
    for name in LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name:16s} {version}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"{'CUDA devices':16s} {count}" + (f" (CUDA {torch.version.cuda})" if count else ""))
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i}  {props.name}, {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}")
    for label, path in (("bundled model", bundled_model_dir()), ("tokenizer", bundled_tokenizer_dir()),
                        ("WikiText-2 test", wikitext2_test_path())):
        print(f"{label:16s} {path}{'' if path.exists() else '  (missing)'}")
    return 0
