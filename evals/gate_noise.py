"""Measure the regression gate's noise and (re)write its baseline with tolerances derived from it.

    python evals/gate_noise.py                       # evals/baselines/gate.json, its settings, K = 3
    python evals/gate_noise.py --runs-dir DIR        # keep each run's file in DIR; files already there are reused

The baseline's settings (precisions, window length, window prefix) run once per configuration below, each in a
fresh process writing a scratch baseline (numbers, digests, data-file hashes):

    default     OMP_NUM_THREADS=2, the precisions in the baseline's order
    repeat      the same again: are two fresh processes bit-identical?
    threads-1   OMP_NUM_THREADS=1 (torch's intra-op threads, and the quantizer's)
    reversed    the quantized precisions in reverse order
    avx2        ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2: oneDNN and ATen kernels without AVX-512
                (LLM.int8 then leaves torch._int_mm, which bitsandbytes uses only with AVX-512)
    avx2-1-rev  all of the above at once: AVX2, one thread, reversed order
    no-bf16-4bit  bitsandbytes' 4-bit layers without their fused AVX512-BF16 kernel (dequantize, then matmul), as
                on a CPU without AVX512-BF16: simulated by patching bitsandbytes' CPU feature check in the process

Per precision and measure the spread is max - min over the runs (relative to the default run for perplexity and
KL, percentage points for top-1); each tolerance is max(K x spread, floor), the floors being
qopt.evaluation.gate.Limits' defaults, and a digest is pinned only if it was identical in every run. The default
run's numbers become the baseline; the spreads, the runs and the rule go into its "noise" field.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qopt.evaluation import gate  # noqa: E402
from qopt.evaluation.precisions import DEFAULT_PRECISIONS  # noqa: E402
from qopt.evaluation.report import UNQUANTIZED  # noqa: E402

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
RUNS = {  # name: (threads, reversed order, extra environment, Python run before the command or None)
    "default": (2, False, {}, None),
    "repeat": (2, False, {}, None),
    "threads-1": (1, False, {}, None),
    "reversed": (2, True, {}, None),
    "avx2": (2, False, AVX2, None),
    "avx2-1-rev": (1, True, AVX2, None),
    "no-bf16-4bit": (2, False, {}, "import bitsandbytes.nn.modules as m; m.has_avx512bf16 = lambda: False"),
}
GATE_DEFAULTS = {"precisions": [*DEFAULT_PRECISIONS, "nf4-calibrated"], "seqlen": 256, "windows": 16, "stride": None}


def run_environment(threads: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def cpu_capability(env: dict[str, str]) -> str:
    """What ATen dispatches to under `env` (checks that ATEN_CPU_CAPABILITY took effect)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_order(precisions: list[str], reverse: bool) -> list[str]:
    if not reverse:
        return list(precisions)
    unquantized = [p for p in precisions if p in UNQUANTIZED]
    return unquantized + [p for p in precisions if p not in UNQUANTIZED][::-1]


def measure_run(name: str, settings: dict, out: Path, model: str | None) -> dict:
    threads, reverse, extra, prelude = RUNS[name]
    env = run_environment(threads, extra)
    order = run_order(settings["precisions"], reverse)
    info = {"name": name, "threads": threads, "order": order, "environment": extra,
            "cpu_capability": cpu_capability(env).split()[0],
            "bitsandbytes_4bit": "dequantize + matmul (simulated)" if prelude else "fused AVX512-BF16 kernel"}
    if prelude:
        info["patch"] = prelude
    if out.exists():
        print(f"{name}: reusing {out}", flush=True)
        return info
    command = ["-m", "qopt"] if prelude is None else [
        "-c", f"{prelude}; import sys; from qopt.cli import main; sys.exit(main(sys.argv[1:]))"]
    cmd = [sys.executable, *command, "eval", *([model] if model else []), "--compare", "--precisions", *order,
           "--seqlen", str(settings["seqlen"]), "--write-baseline", str(out)]
    if settings.get("windows") is not None:
        cmd += ["--windows", str(settings["windows"])]
    if settings.get("stride") is not None:
        cmd += ["--stride", str(settings["stride"])]
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name}: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{name}: {threads} thread(s), {info['cpu_capability']}, {time.perf_counter() - began:.0f} s", flush=True)
    return info


def spreads(runs: dict[str, gate.Baseline], first: gate.Baseline) -> dict[str, dict]:
    """Per precision: max - min of each measure over the runs, and whether each digest stayed identical."""
    result = {}
    for base in first.report.rows:
        rows = [b.report.row(base.precision) for b in runs.values()]
        ppl = [r.ppl for r in rows]
        entry = {"ppl_relative": (max(ppl) - min(ppl)) / base.ppl, "values": {"ppl": ppl}}
        if base.kl is not None:
            kl, top1 = [r.kl for r in rows], [r.top1 for r in rows]
            entry.update(kl_relative=(max(kl) - min(kl)) / base.kl, kl_absolute=max(kl) - min(kl),
                         top1_points=100 * (max(top1) - min(top1)))
            entry["values"].update(kl=kl, top1=top1)
        digests = [b.digests.get(base.precision) for b in runs.values()]
        entry["digests_identical"] = {kind: len({d[kind] for d in digests}) == 1 for kind in gate.DIGESTS}
        result[base.precision] = entry
    return result


def limits_from(spread: dict, k: float, floors: gate.Limits) -> gate.Limits:
    return gate.Limits(ppl=max(k * spread["ppl_relative"], floors.ppl),
                       kl=max(k * spread.get("kl_relative", 0.0), floors.kl),
                       kl_floor=max(k * spread.get("kl_absolute", 0.0), floors.kl_floor),
                       top1=max(k * spread.get("top1_points", 0.0), floors.top1),
                       digests=tuple(kind for kind, same in spread["digests_identical"].items() if same))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=str(ROOT / "evals" / "baselines" / "gate.json"),
                        help="baseline to write; its settings are measured if it exists")
    parser.add_argument("--model", help="checkpoint folder (default: the baseline's model, else the bundled one)")
    parser.add_argument("--precisions", nargs="+", help="instead of the baseline's")
    parser.add_argument("--k", type=float, default=3.0, help="tolerance = max(K x spread, floor)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="configurations to run (the first one's numbers become the baseline)")
    parser.add_argument("--runs-dir", help="keep each run's scratch baseline here; files already there are reused "
                                           "(default: a temporary folder, every run measured afresh)")
    args = parser.parse_args(argv)

    path = Path(args.baseline)
    settings, ratio, model = dict(GATE_DEFAULTS), None, args.model
    if path.exists():
        old = gate.read_baseline(path)
        settings.update({k: old.report.settings.get(k) for k in ("precisions", "seqlen", "windows", "stride")})
        ratio = old.tolerance.max_gap_ratio
        model = model or (None if old.report.model == gate.BUNDLED else old.report.model)
    if args.precisions:
        settings["precisions"] = args.precisions
    scratch = None if args.runs_dir else tempfile.TemporaryDirectory(prefix="gate_noise_")
    folder = Path(args.runs_dir or scratch.name)
    folder.mkdir(parents=True, exist_ok=True)
    infos = [measure_run(name, settings, folder / f"{name}.json", model) for name in args.runs]
    runs = {name: gate.read_baseline(folder / f"{name}.json") for name in args.runs}
    first = runs[args.runs[0]]
    floors = gate.Limits()
    spread = spreads(runs, first)
    tolerance = gate.Tolerance(floors, {p: limits_from(s, args.k, floors) for p, s in spread.items()}, ratio)
    noise = {"measured": datetime.date.today().isoformat(),
             "method": f"the baseline's settings run {len(runs)} times in fresh processes (runs); spread = max - min "
                       f"per precision and measure (relative to the baseline's value for perplexity and KL, "
                       f"percentage points for top-1); tolerance = max(k x spread, floor); a digest is pinned only "
                       f"if identical in every run; written by evals/gate_noise.py",
             "k": args.k, "floors": floors.to_dict(), "runs": infos, "spread": spread}
    run = gate.Measurement(first.report, first.digests, first.files)
    gate.write_baseline(run, path, tolerance, noise)
    print(f"wrote {path}")
    for name, s in spread.items():
        lim = tolerance.limits(name)
        kl = "" if "kl_relative" not in s else (f", KL {s['kl_relative']:.2%} -> ±{lim.kl:.1%}, "
                                                 f"top-1 {s['top1_points']:.3f} pt -> ±{lim.top1:.2f} pt")
        print(f"  {name}: perplexity {s['ppl_relative']:.4%} -> ±{lim.ppl:.2%}{kl}, digests pinned: "
              f"{', '.join(lim.digests) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
