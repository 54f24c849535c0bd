"""`qopt eval`: perplexity at one precision, a side-by-side comparison, or the regression gate."""
from __future__ import annotations

import argparse
import sys

from .common import DEFAULT_MODEL_HELP, add_parser, add_placement, model_path, placement, writable_file


API_FLAGS = {"max_windows": "--windows"}  # library argument -> this command's flag, in error messages


def add(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.precisions import DEFAULT_PRECISIONS

    p = add_parser(sub, "eval", "WikiText-2 perplexity at one precision, all of them (--compare), or the "
                                "regression gate (--check)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) applied at every precision")
    p.add_argument("--compare", action="store_true", help="measure several precisions side by side")
    p.add_argument("--precisions", nargs="+", metavar="P",
                   help=f"with --compare (default: {' '.join(DEFAULT_PRECISIONS)}); add -calibrated to a "
                        "quantized one (nf4-calibrated) for GPTQ rounding on the shipped calibration sample")
    p.add_argument("--bits", type=int, choices=(32, 16, 8, 4),
                   help="one precision: 32 = fp32, 16 = bf16 (default), 8 = LLM.int8, 4 = --quant-type")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), help="4-bit format (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--seqlen", type=int, help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, help="overlapping windows; each scores its last STRIDE tokens")
    p.add_argument("--windows", type=int, metavar="N", help="measure only the first N windows")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE", help="write perplexity against weight memory as PNG")
    p.add_argument("--check", metavar="BASELINE",
                   help="re-run the baseline's settings; exit 1 if a perplexity moved beyond its tolerance")
    p.add_argument("--write-baseline", metavar="FILE", help="save this run as a gate baseline")
    p.add_argument("--tolerance", type=float,
                   help="relative perplexity tolerance: stored by --write-baseline (default: the gate's), or "
                        "overriding the baseline's with --check")
    p.add_argument("--max-gap-ratio", type=float, metavar="R",
                   help="stored by --write-baseline: each calibrated precision's gap to its reference must stay "
                        "at most R x its round-to-nearest preset's gap (e.g. 0.5)")
    add_placement(p, dtype=False)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.compare import compare_precisions, stored_precision
    from ..evaluation.gate import Tolerance, check_baseline, read_baseline, rerun_baseline, write_baseline
    from ..evaluation.precisions import DEFAULT_PRECISIONS

    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--write-baseline", args.write_baseline)):
        writable_file(path, flag)  # before minutes of evaluation, not after
    where = placement(args)
    options = {"placement": {k: where[k] for k in ("device_map", "max_memory", "offload_folder")},
               "adapter": args.adapter}
    if args.check:
        given = [f"--{k.replace('_', '-')}" for k in ("compare", "precisions", "bits", "quant_type", "double_quant",
                                                       "seqlen", "stride", "windows", "max_gap_ratio")
                 if getattr(args, k)]
        if given:
            raise ValueError(f"--check re-runs the settings stored in {args.check}; drop {' '.join(given)}")
        baseline, tolerance = read_baseline(args.check)
        result = rerun_baseline(baseline, args.model, **options)
    else:
        if (args.quant_type or args.double_quant) and args.bits != 4:
            raise ValueError("--quant-type and --double-quant apply to --bits 4")
        if args.max_gap_ratio is not None and not args.write_baseline:
            raise ValueError("--max-gap-ratio is stored in a baseline: use it with --write-baseline")
        if args.bits and (args.compare or args.precisions):
            raise ValueError("--bits picks one precision; with --compare, list them with --precisions")
        model = model_path(args.model)
        four = (args.quant_type or "nf4") + ("-dq" if args.double_quant else "")
        single = {32: "fp32", 16: "bf16", 8: "int8", 4: four}[args.bits or 16]
        if args.bits is None:
            single = stored_precision(model) or single  # a pre-quantized checkpoint is measured as saved
        compare = args.compare or bool(args.precisions)
        precisions = (args.precisions or DEFAULT_PRECISIONS) if compare else [single]
        result = compare_precisions(model, precisions, args.seqlen, args.windows, args.stride,
                                    reference=compare, **options)
    print(result.to_markdown())
    if args.json:
        result.save_json(args.json)
    if args.plot:
        result.save_plot(args.plot)
    if args.write_baseline:
        limits = Tolerance(args.tolerance or Tolerance.relative, args.max_gap_ratio)
        write_baseline(result, args.write_baseline, limits)
        print(f"baseline written to {args.write_baseline} (tolerance {limits.describe()})")
    if not args.check:
        return 0
    problems = check_baseline(result, baseline, tolerance)
    for problem in problems:
        print(f"qopt eval: gate: {problem}", file=sys.stderr)
    print(f"gate {args.check}: " + (f"{len(problems)} violation(s)" if problems else
                                    f"all {len(baseline.rows)} perplexities within {tolerance.describe()}"))
    return 1 if problems else 0
