"""Every benchmark in one command: `make bench` (full run) or `make bench QUICK=1` (end to end in minutes).

    python evals/run_all.py                 # full run: evals/results/*.json, then docs/benchmarks.md re-rendered
    python evals/run_all.py --quick         # small shapes, one round: evals/results/quick/*.json (git-ignored)
    python evals/run_all.py --only decode load

A full run takes about 2 hours on 2 CPU cores and needs an otherwise quiet machine (timings are medians of
interleaved runs, but two benchmarks, or a benchmark and a test suite, running side by side measure each other): run
it alone. Each benchmark runs in its own process, one torch thread (OMP_NUM_THREADS=1), and writes its JSON with the
machine's record (evals/results_meta.py); the time each took goes into run_all.json beside them. A full run ends by
re-rendering the tables of docs/benchmarks.md from the new JSONs (evals/render_tables.py); a quick run never touches
the committed JSONs or the docs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
from results_meta import meta, results_path, write  # noqa: E402

SCRATCH = Path(tempfile.gettempdir()) / "qopt-bench"
# name -> (full-run arguments, quick-run arguments); the settings docs/benchmarks.md describes
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "decode": (["evals/bench_decode.py", "--sizes", "125m,350m", "--kinds", "random,outliers,bundled",
                "--repeats", "3", "--threads", "1", "--folder", str(SCRATCH / "decode")],
               ["evals/bench_decode.py", "--quick", "--threads", "1", "--folder", str(SCRATCH / "decode")]),
    "load": (["evals/bench_load.py", "--shape", "1.3b", "--runs", "5", "--folder", str(SCRATCH / "opt-1.3b-synth")],
             ["evals/bench_load.py", "--quick", "--folder", str(SCRATCH / "opt-125m-synth")]),
    "offload": (["evals/bench_offload.py", "--size", "2.7b", "--folder", str(SCRATCH / "offload-2.7b")],
                ["evals/bench_offload.py", "--quick", "--folder", str(SCRATCH / "offload-125m")]),
    "hub": (["evals/bench_hub.py", "--rates", "100", "300", "--runs", "3", "--folder", str(SCRATCH / "opt-1.3b-synth")],
            ["evals/bench_hub.py", "--quick", "--folder", str(SCRATCH / "opt-125m-synth")]),
    "finetune-125m": (["evals/bench_finetune.py", "--shape", "125m", "--steps", "4", "--rounds", "3"],
                      ["evals/bench_finetune.py", "--quick"]),
    "finetune-350m": (["evals/bench_finetune.py", "--shape", "350m", "--steps", "3", "--rounds", "3"], []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every benchmark end to end on small shapes")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="a subset")
    args = parser.parse_args()
    started = time.time()
    record = meta("quick" if args.quick else "full", 1, only=args.only)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    seconds: dict[str, float] = {}
    failed: dict[str, int] = {}
    for name in args.only or BENCHMARKS:
        command = BENCHMARKS[name][1 if args.quick else 0]
        if not command:
            print(f"== {name}: no quick run (the quick finetune run covers its code)", flush=True)
            continue
        print(f"== {name}: {' '.join(command)}", flush=True)
        began = time.time()
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env)
        seconds[name] = round(time.time() - began, 1)
        if done.returncode:  # the others still run: an hour of results is not thrown away for one failure
            failed[name] = done.returncode
            print(f"== {name}: FAILED with exit status {done.returncode} after {seconds[name]:.0f} s", flush=True)
        else:
            print(f"== {name}: {seconds[name]:.0f} s", flush=True)
    write("run_all", args.quick, record, started, results_path("run_all", args.quick), seconds=seconds,
          failed=failed)
    print(f"all benchmarks: {time.time() - started:.0f} s", flush=True)
    if not args.quick:
        subprocess.run([sys.executable, "evals/render_tables.py", "--write"], cwd=ROOT, env=env, check=True)
    if failed:
        sys.exit("run_all: failed: " + ", ".join(f"{name} (exit status {code})" for name, code in failed.items()))


if __name__ == "__main__":
    main()
