"""Per-layer sensitivity to 4-bit rounding, and what the budgeted mixed-precision choice buys.

Usage (bundled model; writes a JSON ranking, a markdown report and a heat-map PNG):
    python calibration/sensitivity_sweep.py --report calibration/reports/bundled_sensitivity

Each decoder linear is rounded alone (round-to-nearest NF4, everything else float) and the change of the
model's output is measured on calibration windows (never the test split): the relative error of the final
hidden states and the increase of the next-token NLL. Then, for budgets that promote a growing share of
the linears to 8-bit, the WikiText-2 test perplexity of the mixed model that promotes the *most* sensitive
linears is compared with one that promotes the *least* sensitive ones under the same budget.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qopt import load
from qopt.bundled import bundled_model_dir
from qopt.calibration.layerwise import SEQUENTIAL_GROUPS, calibration_windows, mixed_precision
from qopt.calibration.sensitivity import (
    choose_precision,
    layer_sensitivity,
    load_sensitivities,
    model_bytes,
    save_sensitivities,
)
from qopt.evaluation.perplexity import evaluate_ids, tokenize, wikitext2_text
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import quantize_model


def heatmap(ranking, layers: int, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n.split(".")[-1] for n in sum(SEQUENTIAL_GROUPS, ())]
    grid = torch.tensor([getattr(s, metric) for s in ranking]).reshape(layers, len(names))
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(names), 1.4 + 0.4 * layers))
    image = ax.imshow(grid.clamp(min=1e-12).log10().numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)])
    fig.colorbar(image, ax=ax, label=f"log10 {metric.upper()} (nats per token)")
    ax.set_title("Sensitivity to NF4 rounding (one linear at a time)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model_dir())
    ap.add_argument("--base", default="nf4", help="4-bit format of the base (nf4, fp4, nf4-dq, fp4-dq)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows for the sensitivity")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows for the budgets")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                    help="fractions of the 4-bit -> 8-bit extra bytes the budgets allow")
    ap.add_argument("--ranking", type=Path, help="reuse a ranking JSON written by an earlier run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", type=Path, default=Path("calibration/reports/sensitivity"),
                    help="output path stem (.json, .md, .png)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = QuantizationConfig.from_name(args.base)
    model = load(args.model, torch_dtype=torch.float32, progress=False)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    if args.ranking:
        ranking = load_sensitivities(args.ranking)
    else:
        windows = calibration_windows(count=args.windows, seqlen=args.seqlen)
        ranking = layer_sensitivity(model, windows, base, metric="kl")
        save_sensitivities(args.report.with_suffix(".json"), ranking, {"model": str(args.model), "base": base.name,
                                                                       "windows": args.windows, "seqlen": args.seqlen})
    heatmap(ranking, model.config.num_hidden_layers, args.report.with_suffix(".png"), "kl")

    ids = tokenize(wikitext2_text())
    reference = load(args.model, torch_dtype=torch.bfloat16, progress=False)

    def measure(quant: QuantizationConfig) -> str:
        """'ppl / KL' of the RTN-quantized mix against the bf16 model on the test windows."""
        quantized = quantize_model(load(args.model, torch_dtype=torch.bfloat16, progress=False), quant)
        result = evaluate_ids(quantized, ids, args.seqlen, max_windows=args.eval_windows, progress=False,
                              reference=reference)
        return f"{result.ppl:.3f} / {result.kl:.3e}"

    ref_ppl = evaluate_ids(reference, ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl
    all4 = model_bytes(model.config, base)
    all8 = model_bytes(model.config, mixed_precision(base, {s.name: 8 for s in ranking}))
    lines = [f"# Sensitivity of {args.model.name} to {base.name} rounding", "",
             f"One linear rounded at a time (round-to-nearest), {args.windows} calibration windows of "
             f"{args.seqlen} tokens, ranked by KL(float || quantized) of the next-token distributions (nats per "
             f"token; the ranking the budget uses). Relative output error = mean squared change of the final "
             f"hidden states over their mean square. Heat map of the KL: `{args.report.name}.png`.", "",
             "| rank | linear | parameters | KL | NLL increase | relative output error |", "|---|---|---|---|---|---|"]
    ordered = sorted(ranking, key=lambda s: s.kl, reverse=True)
    for rank, s in enumerate(ordered, 1):
        lines.append(f"| {rank} | {s.name} | {s.parameters:,} | {s.kl:.3e} | {s.nll_increase:+.5f} | "
                     f"{s.output_error:.3e} |")
    lines += ["", f"## Budgets (RTN, WikiText-2 test, first {args.eval_windows} windows of {args.seqlen}, bf16)", "",
              f"Float (bf16) perplexity {ref_ppl:.3f}; all-{base.name} model {all4 / 2**20:.2f} MiB, "
              f"all-int8 linears {all8 / 2**20:.2f} MiB.", "",
              "Each cell: perplexity / KL(bf16 model || mixed model) in nats per token. KL is the steadier measure: "
              "on a barely trained model a perturbation can lower the perplexity of a few windows by chance.", "",
              "| budget MiB | promoted to 8-bit | most sensitive promoted | least sensitive promoted |",
              "|---|---|---|---|", f"| {all4 / 2**20:.2f} | 0 | {measure(base)} | - |"]
    for share in args.shares:
        budget = int(all4 + share * (all8 - all4))
        plan = choose_precision(model, ranking, budget, base, 8)
        inverse = [type(s)(s.name, s.parameters, s.output_error, kl=-s.kl) for s in ranking]
        worst = choose_precision(model, inverse, budget, base, 8)
        lines.append(f"| {budget / 2**20:.2f} | {len(plan.promoted())} | {measure(plan.quantization)} | "
                     f"{measure(worst.quantization)} |")
        print(lines[-1], flush=True)
    args.report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"wrote": [str(args.report.with_suffix(x)) for x in (".json", ".md", ".png")]}))


if __name__ == "__main__":
    main()
