"""`qopt plan`: the memory plan of a model from its config alone, before any weight is read."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory plan (weights per device, KV cache, activations, device map) from a "
                                    "config alone, before any weight is read")
    p.add_argument("model", help="config.json, checkpoint folder, or a size name such as opt-30b")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--gpu", action="append", metavar="SIZE",
                   help="memory of a GPU, e.g. 24GiB (repeat for GPUs 1, 2, ...)")
    p.add_argument("--cpu", metavar="SIZE", help="CPU memory for weights, e.g. 64GiB")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence held in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--strategy", choices=("auto", "balanced", "balanced_low_0", "sequential"), default="auto")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..place.plan import plan

    memory: dict | None = {i: size for i, size in enumerate(args.gpu or [])}
    if args.cpu:
        memory["cpu"] = args.cpu
    result = plan(args.model, args.bits, memory or None, args.context, args.batch, quant_type=args.quant_type,
                  double_quant=args.double_quant, strategy=args.strategy)
    print(result.format())
    return 0
