"""`qopt merge`: an adapter folded into its base and saved, with what the merge kept of the adapter's gain."""
from __future__ import annotations

import argparse

from ..quant.presets import PRESETS
from .common import add_output, add_parser, start_load, writable_file

API_FLAGS = {"base_quantization": "--base-quantization", "bits": "--bits", "method": "--method"}


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "merge", "merge a LoRA adapter into its base model, save it at 16, 8 or 4 bits and "
                                 "measure the NLL / KL change against the unmerged adapter on WikiText-2")
    p.add_argument("base", help="the base checkpoint folder the adapter was trained on")
    p.add_argument("adapter", help="the adapter folder (PEFT format)")
    p.add_argument("--ignore-base", action="store_true", help="merge even into a base the adapter was not made for "
                   "(by default one that differs only by name or folder is accepted, another shape refused)")
    add_output(p, "folder for the merged checkpoint")
    p.add_argument("--force", action="store_true", help="replace a model already in --output")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=16,
                   help="16: float weights (--dtype); 8 / 4: re-quantized after the merge")
    p.add_argument("--method", choices=("rtn", "calibrated"), default="rtn",
                   help="how 8 / 4 bits round the merged weights: round to nearest, or GPTQ calibration")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the merged model's unquantized weights")
    p.add_argument("--base-quantization", default="auto", choices=("auto", "none", *PRESETS),
                   help="how the base was loaded for training (auto: from the adapter's qopt checkpoint, float "
                        "when there is none)")
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows to measure on")
    p.add_argument("--eval-data", metavar="FILE", help="measure on this text instead of WikiText-2 test (e.g. held-"
                   "out text of the adapter's own task)")
    p.add_argument("--calibration-data", metavar="FILE", help="calibrated: text to calibrate on (default: the "
                   "shipped sample)")
    p.add_argument("--calibration-windows", type=int, default=128, help="calibrated: token windows")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.windows < 1:
        raise ValueError(f"--windows must be at least 1, got {args.windows}")
    writable_file(args.output, "--output")
    start_load(args, args.base)
    import torch

    from ..evaluation.merge_quality import merge_adapter

    text = Path(args.calibration_data).read_text(encoding="utf-8") if args.calibration_data else None
    eval_text = Path(args.eval_data).read_text(encoding="utf-8") if args.eval_data else None
    base_quantization = None if args.base_quantization == "none" else args.base_quantization
    result = merge_adapter(args.base, args.adapter, args.output, bits=args.bits, method=args.method,
                           quant_type=args.quant_type, double_quant=args.double_quant,
                           base_quantization=base_quantization, dtype=getattr(torch, args.dtype),
                           windows=args.windows, text=eval_text, calibration_text=text,
                           calibration_count=args.calibration_windows,
                           overwrite=args.force, progress=not args.no_progress, check_base=not args.ignore_base)
    print(result.summary())
    warning = result.quality.warning()
    if warning and args.bits != 16:
        print(f"warning: {warning}")
    return 0
