"""What merging an adapter keeps of its gain: 16-bit, 8-bit and 4-bit (round-to-nearest, calibrated) merges.

Usage:  python evals/merge_quality.py BASE ADAPTER [--windows 40] [--eval-data FILE]

One process: the unmerged adapter model is loaded once (its base as it was trained, read from the adapter's
qopt checkpoint), base and adapter NLLs are measured once per text, then each merge is built
(`qopt.evaluation.merge_quality.merged_model`), saved, loaded back and scored against the adapter model: NLL,
KL(adapter model || merged) and the share of the adapter's gain over the base that the merge lost. Texts:
WikiText-2 test (`--windows` windows of the model's context) and, with `--eval-data`, held-out text of the
adapter's own task. `qopt merge` measures one merge the same way.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

MERGES = [(16, "rtn"), (8, "rtn"), (4, "rtn"), (4, "calibrated")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-data", help="held-out text of the adapter's task, measured beside WikiText-2")
    args = ap.parse_args()
    import qopt
    from qopt.evaluation.merge_quality import MergeQuality, adapter_nlls, merged_model
    from qopt.evaluation.perplexity import evaluate_perplexity
    from qopt.finetuning.merge import load_adapter_model, training_quantization

    quant = training_quantization(args.adapter)
    unmerged = load_adapter_model(args.base, args.adapter, quant, progress=False)
    texts = {"WikiText-2 test": None}
    if args.eval_data:
        texts[Path(args.eval_data).name] = Path(args.eval_data).read_text(encoding="utf-8")
    reference = {name: adapter_nlls(unmerged, args.windows, text, progress=False) for name, text in texts.items()}
    print(f"base quantization: {quant or 'float'}")
    print("| merge | text | base NLL | adapter NLL | merged NLL | KL to adapter model | gain lost |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, method in MERGES:
            model, _ = merged_model(args.base, args.adapter, bits=bits, method=method, base_quantization=quant,
                                    progress=False)
            folder = Path(tmp) / f"{bits}-{method}"
            model.save_pretrained(folder)
            del model
            written = qopt.load(folder, progress=False)
            for name, text in texts.items():
                scored = evaluate_perplexity(written, text=text, max_windows=args.windows, progress=False,
                                             reference=unmerged)
                q = MergeQuality(*reference[name], scored.nll, scored.kl, scored.tokens)
                label = "16-bit" if bits == 16 else f"{bits}-bit {method}"
                print(f"| {label} | {name} | {q.base_nll:.4f} | {q.adapter_nll:.4f} | {q.merged_nll:.4f} | "
                      f"{q.kl:.5f} | {q.lost_fraction:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
