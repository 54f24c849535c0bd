"""The tables of docs/benchmarks.md, rendered from the committed results (evals/results/, evals/baselines/).

    python evals/render_tables.py --write     # rewrite every rendered table in docs/benchmarks.md
    python evals/render_tables.py --check     # exit 1 naming each table that differs from its JSON

A rendered table sits between `<!-- table: NAME -->` and `<!-- /table -->`; everything outside those markers is
prose, written by hand. Where a benchmark has no full-run JSON of the current form yet, the table renders what
the earlier results file holds and marks the rows that run would add "not yet measured". tests/test_bench_tables.py
runs --check, so a table that disagrees with its JSON fails the suite.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
NYM = "not yet measured"
GIB = 2**30


def _json(name: str, folder: Path = RESULTS) -> Any:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _full(data: Any) -> Any:
    """A results JSON of the current form from a full run, else None (a quick run's never renders)."""
    return data if isinstance(data, dict) and data.get("meta", {}).get("mode") == "full" else None


def _table(head: list[str], rows: list[list[str]], right: int = 0) -> str:
    align = ["---"] * (len(head) - right) + ["---:"] * right
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _meta_line(data: dict) -> str:
    m = data["meta"]
    v = m["versions"]
    return (f"Run of {m['started'][:10]} at commit {m['git_commit'][:12]}, {m['cpu_model']} ({m['cpu_count']} CPUs; "
            f"{', '.join(m['cpu_flags'])}), {m['threads']} thread(s), torch {v['torch']}, bitsandbytes "
            f"{v['bitsandbytes']}, transformers {v['transformers']}, peft {v['peft']}; load average "
            f"{m['load_average_start'][0]:.2f} at the start, {m['load_average_end'][0]:.2f} at the end; "
            f"{m['seconds'] / 60:.0f} minutes.")


# -- precision comparison ----------------------------------------------------------------------------------------
def precision(report: dict) -> str:
    rows = []
    for r in report["rows"]:
        delta = "" if r["delta"] is None else f"{r['delta']:+.3f} ({r['delta_rel']:+.2%})"
        rows.append([r["precision"], f"{r['ppl']:.3f}", delta, r["reference"] or "",
                     "" if r["kl"] is None else f"{r['kl']:.5f}", "" if r["top1"] is None else f"{r['top1']:.2%}",
                     f"{r['weight_bytes'] / 1e6:.2f}", f"{r['linear_bits_per_param']:.2f}",
                     f"{r['bits_per_param']:.2f}"])
    return _table(["precision", "perplexity", "Δ vs ref", "ref", "KL (nats/token)", "top-1 agree", "weight MB",
                   "bits/param linear", "bits/param model"], rows)


def precision_gate() -> str:
    return precision(json.loads((ROOT / "evals" / "baselines" / "gate.json").read_text()))


def precision_full() -> str:
    return precision(_json("bundled_wikitext2_full.json"))


# -- decode ------------------------------------------------------------------------------------------------------
DECODE_PLAN = [(kind, size) for size in ("125m", "350m") for kind in ("random", "outliers")] + [("bundled", "bundled")]


def decode() -> str:
    data = _full(_json("bench_decode.json"))
    found = {(r["kind"], r["size"], r["mode"]): r for r in data["rows"]} if data else {}
    rows = []
    for kind, size in DECODE_PLAN:
        if not any(k[:2] == (kind, size) for k in found):  # one line for the whole checkpoint
            rows.append([kind, size, "fp32, bf16, int8, nf4"] + [NYM] + [""] * 6)
            continue
        for mode in ("fp32", "bf16", "int8", "nf4"):
            r = found.get((kind, size, mode))
            if r is None:
                rows.append([kind, size, mode] + [NYM] * 7)
                continue
            o, p = r["qopt"], r["transformers"]
            spread = [run["decode"] for run in r["runs"]["qopt"]]
            rows.append([kind, size, mode, f"{100 * r['outlier_rows'] / r['rows']:.1f}%", f"{o['decode']:.1f}",
                         f"{p['decode']:.1f}", f"{r['decode_ratio']:.2f}x ({min(spread):.1f}-{max(spread):.1f})",
                         f"{o['prefill']:.0f}", f"{p['prefill']:.0f}", f"{r['prefill_ratio']:.2f}x"])
    table = _table(["checkpoint", "size", "precision", "rows above 6", "qopt decode tok/s",
                    "transformers decode tok/s", "decode ratio (qopt runs)", "qopt prefill tok/s",
                    "transformers prefill tok/s", "prefill ratio"], rows, right=7)
    return table + ("\n\n" + _meta_line(data) if data else "")


# -- load ----------------------------------------------------------------------------------------------------------
def load() -> str:
    data = _full(_json("bench_load.json"))
    rows = []
    for key, label, unit in (("seconds", "load time", "s"), ("peak", "peak RSS (VmHWM) above imports", "GiB"),
                             ("peak_anon", "peak RssAnon above imports", "GiB")):
        if data is None:
            rows.append([label, NYM, "", "", "<= 0.5"])
            continue
        scale = 1 if unit == "s" else GIB
        cells = []
        for side in ("qopt", "transformers"):
            s = data["summary"][side][key]
            cells.append(f"{s['median'] / scale:.2f} {unit} ({s['spread'] / scale:.2f})")
        rows.append([label, *cells, f"{data['ratios'][key]:.2f}", "<= 0.5"])
    table = _table(["", "qopt", "transformers + bitsandbytes", "ratio", "target"], rows)
    return table + ("\n\n" + _meta_line(data) if data else "")


# -- offload -------------------------------------------------------------------------------------------------------
def _offload_records() -> tuple[list[dict], dict | None]:
    """The current JSON's records, else the earlier log's (runs under the earlier page-cache policy)."""
    data = _full(_json("bench_offload.json"))
    if data:
        return data["records"], data
    path = RESULTS / "bench_offload.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], None


EVAL_LABELS = {"streamed": "qopt layer-streamed, NF4", "streamed-bf16": "qopt layer-streamed, bf16",
               "window": "qopt window-major, NF4", "transformers": "transformers + accelerate, bf16"}
GENERATE_LABELS = {"many": "qopt `generate_many`, NF4", "batched": "qopt batched `generate`, NF4",
                   "single": "qopt `generate` one prompt at a time, NF4", "many-bf16": "qopt `generate_many`, bf16",
                   "transformers": "transformers batched `generate`, bf16"}


def _policy(data: dict | None) -> str:
    return "evict what was read" if data else "earlier: peer evicts every file after each layer"


def offload_eval() -> str:
    records, data = _offload_records()
    rows = []
    for seqlen in sorted({r["seqlen"] for r in records if r["part"] == "eval"}):
        for which, label in EVAL_LABELS.items():
            r = next((r for r in records if r["part"] == "eval" and r["seqlen"] == seqlen and r["which"] == which),
                     None)
            if r is None:
                rows.append([str(seqlen), label, NYM, "", "", ""])
                continue
            rows.append([str(seqlen), label, f"{r['seconds']:.1f} s", f"{r['read_bytes'] / GIB:.2f} GiB",
                         f"{r['offloaded_bytes'] / GIB:.2f} GiB", f"{r['read_bytes'] / r['offloaded_bytes']:.2f}x"])
    table = _table(["windows of", "run", "wall time", "read from disk", "offloaded", "read / offloaded"], rows,
                   right=4)
    return table + f"\n\nPage-cache policy of these runs: {_policy(data)}." + (
        "\n\n" + _meta_line(data) if data else "")


def offload_generate() -> str:
    records, data = _offload_records()
    gen = {r["which"]: r for r in records if r["part"] == "generate"}
    rate = {w: r["tokens"] / r["seconds"] for w, r in gen.items()}
    versus = {"batched": "many", "single": "many", "transformers": "many"}
    rows = []
    for which, label in GENERATE_LABELS.items():
        r = gen.get(which)
        if r is None:
            rows.append([label, NYM, "", ""])
            continue
        ratio = ""
        if which in versus and versus[which] in rate:
            ratio = f"`generate_many` NF4 is {rate[versus[which]] / rate[which]:.2f}x"
        if which == "many-bf16" and "transformers" in rate:
            ratio = f"{rate[which] / rate['transformers']:.2f}x transformers (same bytes)"
        rows.append([label, f"{rate[which]:.2f}", f"{r['read_bytes'] / GIB:.2f} GiB for {r['tokens']} tokens", ratio])
    table = _table(["run", "tokens/s", "read from disk", "ratio"], rows)
    return table + f"\n\nPage-cache policy of these runs: {_policy(data)}." + (
        "\n\n" + _meta_line(data) if data else "")


def offload_step() -> str:
    records, _ = _offload_records()
    r = next((r for r in records if r["part"] == "step"), None)
    if r is None:
        return _table(["", "step", "waiting for reads"], [["prefetch", NYM, NYM], ["no prefetch", NYM, NYM]])
    return _table(["", "step", "waiting for reads"],
                  [["prefetch", f"{r['prefetch_step']:.3f} s", f"{r['prefetch_wait']:.3f} s"],
                   ["no prefetch", f"{r['no_prefetch_step']:.3f} s", f"{r['no_prefetch_wait']:.3f} s"]], right=2)


# -- QLoRA ---------------------------------------------------------------------------------------------------------
FINETUNE_SIDES = {"ours": "qopt default (`qopt.finetune`)", "ours-ckpt": "qopt, every layer recomputed",
                  "plain": "qopt with PEFT's recipe", "peer": "transformers + peft (standard recipe)",
                  "peer-nockpt": "transformers + peft, no gradient checkpointing (PEFT's fastest)",
                  "peer-noprep": "transformers + peft, no k-bit preparation"}


def finetune() -> str:
    rows = []
    for shape in ("125m", "350m"):
        data = _json(f"bench_finetune_{shape}.json")
        if data is None:
            rows += [[shape, label] + [NYM] * 7 for label in FINETUNE_SIDES.values()]
            continue
        med, runs = data["medians"], data["runs"]
        peer, fastest = med["peer"], med.get("peer-nockpt")
        for side, label in FINETUNE_SIDES.items():
            m = med.get(side)
            if m is None:
                rows.append([shape, label, NYM] + [""] * 6)
                continue
            layers = "all" if m["checkpointed"] < 0 else str(int(m["checkpointed"]))
            peaks = [r["peak_rss_mib"] for r in runs[side]]
            anon = f"{m['peak_anon_mib']:.0f} MiB" if "peak_anon_mib" in m else NYM
            rows.append([shape, label, layers, f"{m['step_s']:.2f} s", f"{m['tokens_per_s']:.0f}",
                         f"{m['peak_rss_mib']:.0f} MiB ({min(peaks):.0f}-{max(peaks):.0f})", anon,
                         f"{peer['step_s'] / m['step_s']:.2f}x / " +
                         (f"{fastest['step_s'] / m['step_s']:.2f}x" if fastest else NYM),
                         f"{m['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x"])
    return _table(["shape", "side", "layers recomputed", "step", "tokens/s", "peak RSS (runs)", "peak RssAnon",
                   "speed vs standard recipe / vs PEFT's fastest", "memory vs standard recipe"], rows, right=7)


# -- hub -----------------------------------------------------------------------------------------------------------
def hub() -> str:
    data = _json("bench_hub.json")
    rows = []
    load_s = data["load"]["seconds"]
    for rate, r in data["rates"].items():
        bound = max(r["download"]["seconds"], load_s)
        rows.append([f"{float(rate):.0f} MB/s", f"{r['download']['seconds']:.1f} s", f"{load_s:.1f} s",
                     f"{r['stream']['seconds']:.1f} s", f"{r['stream-scratch']['seconds']:.1f} s",
                     f"{r['download+load']['seconds']:.1f} s", f"{r['transformers']['seconds']:.1f} s",
                     f"{r['stream']['seconds'] / bound:.2f} / {r['stream-scratch']['seconds'] / bound:.2f}",
                     f"{r['stream']['peak_disk'] / 1e9:.2f} / {r['stream-scratch']['peak_disk'] / 1e9:.2f} GB"])
    return _table(["rate", "pure download", "pure load", "`qopt.load(id)`", "`keep_download=False`",
                   "download, then load", "transformers", "streamed / max(download, load)",
                   "peak extra disk (kept / not kept)"], rows)


# -- scale ---------------------------------------------------------------------------------------------------------
def scale() -> str:
    """OPT-30B / OPT-66B at their real size: the checks evals/bench_scale.py stored with each run."""
    sys.path.insert(0, str(ROOT / "evals"))
    from scale_report import table

    data = _json("bench_scale.json")
    return table(data) if data else NYM


TABLES: dict[str, Callable[[], str]] = {
    "precision-gate": precision_gate, "precision-full": precision_full, "decode": decode, "load": load,
    "offload-eval": offload_eval, "offload-generate": offload_generate, "offload-step": offload_step,
    "finetune": finetune, "hub": hub, "scale": scale}
MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)((?:(?!<!-- table:).)*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    """`text` with every marked table replaced by its rendering; an unknown name raises KeyError."""
    return MARKER.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4), text)


def differences(text: str) -> list[str]:
    """Names of the marked tables in `text` that differ from their rendering."""
    return [m.group(2) for m in MARKER.finditer(text) if m.group(3) != TABLES[m.group(2)]() + "\n"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true")
    action.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = DOC.read_text()
    if args.write:
        DOC.write_text(render(text))
        print(f"rendered {len(MARKER.findall(text))} tables into {DOC.relative_to(ROOT)}")
        return 0
    stale = differences(text)
    for name in stale:
        print(f"{DOC.relative_to(ROOT)}: table '{name}' differs from its results JSON "
              f"(python evals/render_tables.py --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
