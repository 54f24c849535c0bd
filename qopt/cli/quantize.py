"""`qopt quantize`: a pre-quantized checkpoint (round-to-nearest, GPTQ-calibrated, or mixed under a budget)."""
from __future__ import annotations

import argparse

from ..utils import format_bytes
from .common import DEFAULT_MODEL_HELP, model_path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a pre-quantized checkpoint (bitsandbytes layout, loads in "
                                        "transformers too)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (written atomically; never the input)")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--method", choices=("rtn", "calibrated"), default="rtn",
                   help="rtn: round to nearest while streaming the checkpoint; calibrated: GPTQ rounding on "
                        "calibration text, one decoder layer at a time")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the tensors left unquantized (embeddings, norms, biases)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB")
    p.add_argument("--budget", help="memory budget of the whole model, e.g. 16GiB: the linears most sensitive to "
                                    "4-bit rounding stay in --high-bits while it fits (4-bit base only)")
    p.add_argument("--high-bits", type=int, choices=(8, 16), default=8,
                   help="width of the linears kept out of 4-bit under --budget (16 also loads in transformers)")
    p.add_argument("--calibration-data", help="text file to calibrate on (default: the shipped sample of "
                                              "WikiText-2 train and public-domain prose)")
    p.add_argument("--calibration-windows", type=int, default=128, help="random token windows to calibrate on")
    p.add_argument("--calibration-seqlen", type=int, help="tokens per window (default: the model's context)")
    p.set_defaults(handler=run)


def _quantize_preset(args: argparse.Namespace) -> str:
    """The preset name (int8, nf4, fp4-dq, ...) that --bits / --quant-type / --double-quant spell."""
    if args.bits == 8 and (args.double_quant or args.quant_type != "nf4"):
        raise ValueError("--quant-type and --double-quant apply to --bits 4")
    return "int8" if args.bits == 8 else args.quant_type + ("-dq" if args.double_quant else "")


def run(args: argparse.Namespace) -> int:
    from ..errors import OutputError
    from ..io.outputs import check_output_folder

    try:  # before any work: a wrong --out fails in a second, and the input is never written
        check_output_folder(args.out, [model_path(args.model)], overwrite=args.force)
        return _run(args)
    except OutputError as err:
        raise err.spelled("--force") from None


def _run(args: argparse.Namespace) -> int:
    if args.method == "rtn" and args.budget is None:
        return _quantize_rtn(args)
    from pathlib import Path

    from ..calibration.layerwise import CalibrationConfig, calibrate_checkpoint
    from ..calibration.sensitivity import plan_for_checkpoint
    from ..loading.loader import quantize_checkpoint
    from ..quant.config import QuantizationConfig

    quant = QuantizationConfig.from_name(_quantize_preset(args))
    path = model_path(args.model)
    text = Path(args.calibration_data).read_text(encoding="utf-8") if args.calibration_data else None
    if args.budget is not None:
        if args.bits != 4:
            raise ValueError("--budget mixes 4-bit with --high-bits linears: use it with --bits 4")
        plan = plan_for_checkpoint(path, args.budget, quant, args.high_bits, text=text,
                                   seqlen=args.calibration_seqlen)
        quant = plan.quantization
        print(f"budget {format_bytes(plan.budget_bytes)}: {len(plan.promoted())} linears in {args.high_bits}-bit, "
              f"the rest in {quant.name}; model {format_bytes(plan.total_bytes)} "
              f"(all 4-bit: {format_bytes(plan.all_4bit_bytes)})")
    if args.method == "rtn":
        layers, nbytes = quantize_checkpoint(path, args.out, quant, torch_dtype=args.dtype,
                                             max_shard_size=args.max_shard_size, overwrite=args.force)
        print(f"wrote {args.out}: {layers} quantized layers, {format_bytes(nbytes)} of weights")
        return 0
    import torch

    config = CalibrationConfig(quantization=quant, dtype=getattr(torch, args.dtype))
    report = calibrate_checkpoint(path, args.out, config, text=text, count=args.calibration_windows,
                                  seqlen=args.calibration_seqlen, max_shard_size=args.max_shard_size,
                                  overwrite=args.force)
    print(f"wrote {args.out}: {report.summary()}")
    return 0


def _quantize_rtn(args: argparse.Namespace) -> int:
    from ..loading.loader import quantize_checkpoint
    from ..quant.config import QuantizationConfig

    config = QuantizationConfig.from_name(_quantize_preset(args))
    layers, nbytes = quantize_checkpoint(model_path(args.model), args.out, config, torch_dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.force)
    print(f"wrote {args.out}: {config.name}, {layers} quantized layers, {format_bytes(nbytes)} of weights")
    return 0
