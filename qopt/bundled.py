"""Paths of the files that ship inside the package, so no command needs a download."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED = "bundled"  # the name that stands for the shipped model or tokenizer (in a report, as a path argument)


def data_dir() -> Path:
    return Path(str(resources.files("qopt") / "data"))


def bundled_model_dir() -> Path:
    """The small OPT trained by evals/pretrain_bundled_model.py (see its MODEL_CARD.md)."""
    return data_dir() / "model"


def bundled_tokenizer_dir() -> Path:
    return data_dir() / "tokenizer"


def wikitext2_test_path() -> Path:
    """WikiText-2 raw test split (CC BY-SA 3.0); evaluation only."""
    return data_dir() / "wikitext-2" / "wiki.test.raw"
