"""Calibrated (GPTQ) vs round-to-nearest quantization: WikiText-2 test perplexity gaps to the float model.

Usage (bundled model, first 40 windows of 256 tokens; --windows 0 = the whole test split):
    python calibration/compare_methods.py --formats nf4 nf4-dq fp4 int8 --windows 40 \
        --report calibration/reports/bundled_gptq_vs_rtn.md

Every model is evaluated in bf16 compute against the float model in bf16, so the gap is quantization alone; the gap is
ppl(quantized) - ppl(reference) and "gap ratio" is the calibrated gap over the round-to-nearest gap. The
calibration windows come from the shipped sample (WikiText-2 *train* and public-domain prose), never from the
test split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qopt import load
from qopt.bundled import bundled_model_dir
from qopt.calibration.layerwise import CalibrationConfig, calibrate, calibration_windows
from qopt.evaluation.perplexity import evaluate_ids, tokenize, wikitext2_text
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model_dir())
    ap.add_argument("--formats", nargs="+", default=["nf4", "nf4-dq", "fp4", "int8"])
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (0 = all)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calibration-windows", type=int, default=128)
    ap.add_argument("--clip-search", type=int, default=0)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", type=Path, help="write a markdown table here (and the JSON beside it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = tokenize(wikitext2_text())
    max_windows = args.windows or None
    reference = load(args.model, torch_dtype=torch.bfloat16, progress=False)
    ref = evaluate_ids(reference, ids, args.seqlen, max_windows=max_windows, progress=False)
    print(f"bf16 reference: {ref.summary()}", flush=True)
    windows = calibration_windows(count=args.calibration_windows, seqlen=args.seqlen)
    rows = []
    for name in args.formats:
        quant = QuantizationConfig.from_name(name)
        rtn_model = quantize_model(load(args.model, torch_dtype=torch.bfloat16, progress=False), quant)
        rtn = evaluate_ids(rtn_model, ids, args.seqlen, max_windows=max_windows, progress=False, reference=reference)
        del rtn_model
        config = CalibrationConfig(quantization=quant, clip_search=args.clip_search, act_order=args.act_order)
        began = time.perf_counter()
        cal_model, report = calibrate(args.model, windows, config, progress=False)
        seconds = time.perf_counter() - began
        cal = evaluate_ids(cal_model, ids, args.seqlen, max_windows=max_windows, progress=False, reference=reference)
        del cal_model
        gap_rtn, gap_cal = rtn.ppl - ref.ppl, cal.ppl - ref.ppl
        row = {"format": name, "reference_ppl": ref.ppl, "rtn_ppl": rtn.ppl, "calibrated_ppl": cal.ppl,
               "rtn_gap": gap_rtn, "calibrated_gap": gap_cal, "gap_ratio": gap_cal / gap_rtn if gap_rtn else None,
               "rtn_kl": rtn.kl, "calibrated_kl": cal.kl, "rtn_top1": rtn.top1, "calibrated_top1": cal.top1,
               "calibration_seconds": seconds, "layer_error_ratio": report.error_ratio()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = [f"WikiText-2 test, {ref.windows} windows of {args.seqlen} ({ref.tokens:,} scored tokens), bf16 "
             f"compute; reference (bf16) perplexity {ref.ppl:.3f}. Calibration: {args.calibration_windows} "
             f"windows of {args.seqlen} tokens from the shipped sample, clip search {args.clip_search}, "
             f"act order {args.act_order}.", "",
             "| format | RTN ppl | calibrated ppl | RTN gap | calibrated gap | gap ratio | KL RTN | KL calibrated "
             "| calibration s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['gap_ratio']:.3f}" if r["gap_ratio"] is not None else "n/a"
        table.append(f"| {r['format']} | {r['rtn_ppl']:.3f} | {r['calibrated_ppl']:.3f} | {r['rtn_gap']:+.3f} | "
                     f"{r['calibrated_gap']:+.3f} | {ratio} | {r['rtn_kl']:.5f} | {r['calibrated_kl']:.5f} | "
                     f"{r['calibration_seconds']:.0f} |")
    print("\n".join(table))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(table) + "\n")
        args.report.with_suffix(".json").write_text(json.dumps({"reference": ref.to_dict(), "rows": rows},
                                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
