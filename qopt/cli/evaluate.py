"""`qopt eval`: perplexity at one precision, a side-by-side comparison, or the regression gate."""
from __future__ import annotations

import argparse
from typing import Any

from .common import (
    DEFAULT_MODEL_HELP,
    add_parser,
    add_placement,
    generation_budget,
    model_path,
    placement,
    show_bars,
    start_load,
    writable_file,
)

API_FLAGS = {"max_windows": "--windows"}  # library argument -> this command's flag, in error messages
_TOLERANCE_FLAGS = ("tolerance", "kl_tolerance", "kl_floor", "top1_tolerance", "no_digest")


def add(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.precisions import DEFAULT_PRECISIONS

    p = add_parser(sub, "eval", "WikiText-2 perplexity at one precision, all of them (--compare), or the "
                                "regression gate (--check)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) applied at every precision")
    p.add_argument("--ignore-base", action="store_true", help="apply --adapter even to a base it was not made for "
                   "(by default one that differs only by name or folder is accepted, another shape refused)")
    p.add_argument("--compare", action="store_true", help="measure several precisions side by side")
    p.add_argument("--precisions", nargs="+", metavar="P",
                   help=f"with --compare (default: {' '.join(DEFAULT_PRECISIONS)}); add -calibrated to a "
                        "quantized one (nf4-calibrated) for GPTQ rounding on the shipped calibration sample; with "
                        "--check, a subset of the baseline's precisions (bf16 is added as their reference)")
    p.add_argument("--bits", type=int, choices=(32, 16, 8, 4),
                   help="one precision: 32 = fp32, 16 = bf16 (default), 8 = LLM.int8, 4 = --quant-type")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), help="4-bit format (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--seqlen", type=int, help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, help="overlapping windows; each scores its last STRIDE tokens")
    p.add_argument("--windows", type=int, metavar="N", help="measure only the first N windows")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON; with --check, the gate's verdict")
    p.add_argument("--plot", metavar="FILE", help="write perplexity against weight memory as PNG")
    g = p.add_argument_group("regression gate (defaults: the baseline's tolerances, derived from measured noise)")
    g.add_argument("--check", metavar="BASELINE",
                   help="re-run the baseline's settings; exit 1 if a measure moved beyond its tolerance, 2 if the "
                        "run is not comparable (other text or tokenizer files, a missing baseline)")
    g.add_argument("--write-baseline", metavar="FILE", help="save this run as a gate baseline")
    g.add_argument("--tolerance", type=float, metavar="REL",
                   help="perplexity, relative: overrides the baseline's with --check; stored by --write-baseline")
    g.add_argument("--kl-tolerance", type=float, metavar="REL", help="KL to the reference, relative")
    g.add_argument("--kl-floor", type=float, metavar="NATS", help="KL change always allowed, nats per token")
    g.add_argument("--top1-tolerance", type=float, metavar="POINTS",
                   help="top-1 agreement with the reference, percentage points")
    g.add_argument("--no-digest", action="store_true",
                   help="do not compare the saved-state and module-settings digests")
    g.add_argument("--max-gap-ratio", type=float, metavar="R",
                   help="stored by --write-baseline: each calibrated precision's gap to its reference must stay "
                        "at most R x its round-to-nearest preset's gap (e.g. 0.5)")
    add_placement(p, dtype=False)
    p.set_defaults(handler=run)


def _tolerance_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"ppl": args.tolerance, "kl": args.kl_tolerance, "kl_floor": args.kl_floor, "top1": args.top1_tolerance,
            "digests": () if args.no_digest else None}


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--write-baseline", args.write_baseline)):
        writable_file(path, flag)  # before minutes of evaluation, not after
    start_load(args, args.model or (f"the model of {args.check}" if args.check else model_path(None)))
    from ..evaluation import gate
    from ..evaluation.compare import compare_precisions, stored_precision
    from ..evaluation.precisions import DEFAULT_PRECISIONS

    where = placement(args)
    options = {"placement": {k: v for k, v in where.items() if k != "torch_dtype"},
               "adapter": args.adapter, "check_base": not args.ignore_base, "load_progress": show_bars()}
    if args.check:  # the window length is the baseline's: only an explicit --context is reserved
        if args.context:
            options["placement"].update(generation_budget(args, where, None, all_logits=True))
    else:  # one window at a time, of --seqlen tokens (default: the model's positions)
        options["placement"].update(generation_budget(args, where, args.seqlen, all_logits=True))
    overrides = _tolerance_overrides(args)
    if args.check:
        given = [f"--{k.replace('_', '-')}" for k in ("compare", "bits", "quant_type", "double_quant", "seqlen",
                                                       "stride", "windows", "max_gap_ratio") if getattr(args, k)]
        if given:
            raise ValueError(f"--check re-runs the settings stored in {args.check}; drop {' '.join(given)}")
        return _check(args, overrides, options)
    if (args.quant_type or args.double_quant) and args.bits != 4:
        raise ValueError("--quant-type and --double-quant apply to --bits 4")
    if args.max_gap_ratio is not None and not args.write_baseline:
        raise ValueError("--max-gap-ratio is stored in a baseline: use it with --write-baseline")
    tolerances = [f"--{k.replace('_', '-')}" for k in _TOLERANCE_FLAGS if getattr(args, k) not in (None, False)]
    if tolerances and not args.write_baseline:
        raise ValueError(f"{' '.join(tolerances)}: use with --check or --write-baseline")
    if args.bits and (args.compare or args.precisions):
        raise ValueError("--bits picks one precision; with --compare, list them with --precisions")
    model = model_path(args.model)
    four = (args.quant_type or "nf4") + ("-dq" if args.double_quant else "")
    single = {32: "fp32", 16: "bf16", 8: "int8", 4: four}[args.bits or 16]
    if args.bits is None:
        single = stored_precision(model) or single  # a pre-quantized checkpoint is measured as saved
    compare = args.compare or bool(args.precisions)
    precisions = (args.precisions or DEFAULT_PRECISIONS) if compare else [single]
    if args.write_baseline:  # a baseline also records digests and data-file hashes
        result = gate.measure(model, precisions, args.seqlen, args.windows, args.stride, reference=compare,
                              **options)
    else:
        result = gate.Measurement(compare_precisions(model, precisions, args.seqlen, args.windows, args.stride,
                                                     reference=compare, **options))
    print(result.report.to_markdown())
    if args.json:
        result.report.save_json(args.json)
    if args.plot:
        result.report.save_plot(args.plot)
    if args.write_baseline:
        tolerance = gate.Tolerance(gate.Limits(), max_gap_ratio=args.max_gap_ratio).override(**overrides)
        gate.write_baseline(result, args.write_baseline, tolerance)
        print(f"baseline written to {args.write_baseline} (tolerance: {tolerance.describe()}; evals/gate_noise.py "
              f"derives per-precision tolerances from measured noise)")
    return 0


def _check(args: argparse.Namespace, overrides: dict[str, Any], options: dict[str, Any]) -> int:
    """`--check`: the verdict as a table of what moved; exit 1 on a regression, 2 when nothing is comparable."""
    from ..errors import QoptError
    from ..evaluation import gate, verdict

    try:
        baseline = gate.read_baseline(args.check)
        tolerance = baseline.tolerance.override(**overrides)
        result = gate.rerun_baseline(baseline, args.model, args.precisions, **options)
    except (QoptError, ValueError, FileNotFoundError) as err:
        if args.json:
            verdict.error_verdict(args.json, args.check, err)
        raise
    if result.report.rows:
        print(result.report.to_markdown())
    outcome = verdict.check_baseline(result, baseline, tolerance)
    print(outcome.format())
    if args.json:
        outcome.save_json(args.json, result.report)
    if args.plot and result.report.rows:
        result.report.save_plot(args.plot)
    if args.write_baseline:
        gate.write_baseline(result, args.write_baseline, tolerance)
        print(f"baseline written to {args.write_baseline} (tolerance: {tolerance.describe()})")
    return 0 if outcome.passed else 1
