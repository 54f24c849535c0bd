"""`qopt check`: would vLLM, transformers or PEFT load this saved folder? Rules per consumer, exit 1 on a failure."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_parser

CONSUMERS = ("vllm", "transformers", "peft")  # whose loaders `qopt check` knows


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "check", "check a saved model or adapter folder against vLLM's, transformers' or PEFT's "
                                 "loader (from config.json and shard headers; no weight is read); exit 1 if a "
                                 "rule fails")
    p.add_argument("folder", metavar="DIR", help="a folder written by save_pretrained, qopt quantize or finetune")
    p.add_argument("--for", dest="consumers", action="append", choices=CONSUMERS, metavar="CONSUMER",
                   help=f"{' | '.join(CONSUMERS)} (repeatable; default: vllm and transformers for a model folder, "
                        "peft for an adapter folder)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..compat.adapters import check_adapter_folder
    from ..compat.models import check_model_folder
    from ..errors import CheckpointError
    from ..io.checkpoint import ADAPTER_CONFIG

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    consumers = args.consumers or (["peft"] if (folder / ADAPTER_CONFIG).is_file() and
                                   not (folder / "config.json").is_file() else ["vllm", "transformers"])
    reports = [check_adapter_folder(folder) if c == "peft" else check_model_folder(folder, c)
               for c in dict.fromkeys(consumers)]
    print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.ok for r in reports) else 1
