"""`qopt quantize`: a pre-quantized checkpoint (round-to-nearest, GPTQ-calibrated, or mixed under a budget)."""
from __future__ import annotations

import argparse

from .common import (
    DEFAULT_MODEL_HELP,
    add_hub,
    add_output,
    add_parser,
    add_precision,
    hub_options,
    model_path,
    preset,
    start_load,
    writable_file,
)

API_FLAGS = {"overwrite=True": "--force"}  # library argument -> this command's flag, in error messages


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "quantize", "write a pre-quantized checkpoint (bitsandbytes layout, loads in "
                                    "transformers too)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    add_output(p, "output folder (written atomically; never the input)")
    p.add_argument("--force", action="store_true", help="replace a model already in --output")
    add_precision(p, (4, 8), "4 = --quant-type (default), 8 = LLM.int8")
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
    p.add_argument("--calibration-data", metavar="FILE",
                   help="text file to calibrate on (default: the shipped sample of WikiText-2 train and "
                        "public-domain prose)")
    p.add_argument("--calibration-windows", type=int, default=128, help="random token windows to calibrate on")
    p.add_argument("--calibration-seqlen", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--sensitivity-windows", type=int, default=16,
                   help="random token windows the --budget sensitivity pass ranks the linears on")
    add_hub(p)
    p.set_defaults(handler=run)


def _quantize_preset(args: argparse.Namespace) -> str:
    """The preset the precision flags spell; plain `qopt quantize` means NF4."""
    if (args.quant_type or args.double_quant) and args.bits is None and not args.quantization:
        args.bits = 4  # --quant-type fp4 alone: 4-bit is the default width here
    return preset(args) or "nf4"


def run(args: argparse.Namespace) -> int:
    start_load(args, model_path(args.model))
    from ..io.outputs import check_output_folder
    from ..utils import format_bytes

    # before any work: a wrong --output fails in a second, and the input is never written
    check_output_folder(args.output, [model_path(args.model)], overwrite=args.force)
    writable_file(args.output, "--output")

    if args.method == "rtn" and args.budget is None:
        return _quantize_rtn(args)
    from pathlib import Path

    from ..calibration.layerwise import CalibrationConfig, calibrate_checkpoint
    from ..calibration.sensitivity import plan_for_checkpoint
    from ..io.hub import checkpoint_folder
    from ..loading.loader import quantize_checkpoint
    from ..quant.config import QuantizationConfig

    quant = QuantizationConfig.from_name(_quantize_preset(args))
    if not args.keep_download:
        raise ValueError("--no-keep-download streams one load; --method calibrated and --budget read the checkpoint "
                         "more than once, so a Hub model is downloaded into the HF cache for them")
    path = str(checkpoint_folder(model_path(args.model), revision=args.revision))  # a Hub id: into the cache once
    text = Path(args.calibration_data).read_text(encoding="utf-8") if args.calibration_data else None
    if args.budget is not None:
        if quant.bits != 4:
            raise ValueError("--budget mixes 4-bit with --high-bits linears: use it with --bits 4")
        if args.sensitivity_windows < 1:
            raise ValueError(f"--sensitivity-windows must be at least 1, got {args.sensitivity_windows}")
        import torch

        plan = plan_for_checkpoint(path, args.budget, quant, args.high_bits, text=text, sample=args.sensitivity_windows,
                                   seqlen=args.calibration_seqlen, dtype=getattr(torch, args.dtype))
        quant = plan.quantization
        print(f"budget {format_bytes(plan.budget_bytes)}: {len(plan.promoted())} linears in {args.high_bits}-bit, "
              f"the rest in {quant.name}; model {format_bytes(plan.total_bytes)} "
              f"(all 4-bit: {format_bytes(plan.all_4bit_bytes)}, all {args.high_bits}-bit: "
              f"{format_bytes(plan.all_high_bytes)})")
    if args.method == "rtn":
        layers, nbytes = quantize_checkpoint(path, args.output, quant, torch_dtype=args.dtype,
                                             max_shard_size=args.max_shard_size, overwrite=args.force)
        print(f"wrote {args.output}: {layers} quantized layers, {format_bytes(nbytes)} of weights")
        return 0
    import torch

    config = CalibrationConfig(quantization=quant, dtype=getattr(torch, args.dtype))
    report = calibrate_checkpoint(path, args.output, config, text=text, count=args.calibration_windows,
                                  seqlen=args.calibration_seqlen, max_shard_size=args.max_shard_size,
                                  overwrite=args.force)
    print(f"wrote {args.output}: {report.summary()}")
    return 0


def _quantize_rtn(args: argparse.Namespace) -> int:
    from ..loading.loader import quantize_checkpoint
    from ..quant.config import QuantizationConfig
    from ..utils import format_bytes

    config = QuantizationConfig.from_name(_quantize_preset(args))
    layers, nbytes = quantize_checkpoint(model_path(args.model), args.output, config, torch_dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.force,
                                         **hub_options(args))
    print(f"wrote {args.output}: {config.name}, {layers} quantized layers, {format_bytes(nbytes)} of weights")
    return 0
