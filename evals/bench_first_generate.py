"""Load time and the first `generate` after it, for two qopt trees side by side (e.g. main and a branch).

    .venv/bin/python evals/bench_first_generate.py --old /path/to/main --new . --folder /work/tmp/opt-1.3b-synth

Each run is a fresh process on one thread (torch.set_num_threads(1)) that loads the model in NF4
(`qopt.load(folder, quantization="nf4")`) and then generates `--tokens` new tokens greedily from a fixed
prompt; the two trees alternate run by run (old, new, old, new, ...) so drift on a shared machine hits both
alike, and CPU time (process time) is reported beside wall time: it moves less with the machine's load.
Prints the median and spread of --runs runs per tree and figure, the ratio new / old, and the load
average before and after. Without --folder the bundled model is measured; `--write-1.3b FOLDER` writes the
1.3B-shaped random checkpoint of evals/bench_load.py there first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import qopt
from qopt.bundled import bundled_model_dir
folder, tokens = sys.argv[1] or str(bundled_model_dir()), int(sys.argv[2])
start, cpu_start = time.perf_counter(), time.process_time()
model = qopt.load(folder, quantization="nf4", progress=False)
loaded, cpu_loaded = time.perf_counter(), time.process_time()
out = model.generate(torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]]), max_new_tokens=tokens)
done, cpu_done = time.perf_counter(), time.process_time()
print(json.dumps({"load": loaded - start, "generate": done - loaded, "load_cpu": cpu_loaded - cpu_start,
                  "generate_cpu": cpu_done - cpu_loaded, "tokens": out.shape[1] - 8, "file": qopt.__file__}))
"""


def run(tree: Path, folder: str, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, folder, str(tokens)], capture_output=True, text=True,
                         cwd=tree, env=env)
    if out.returncode:
        raise RuntimeError(f"{tree}: run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(tree.resolve())):
        raise RuntimeError(f"{tree}: the child imported qopt from {result['file']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the baseline tree (a checkout of main)")
    parser.add_argument("--new", type=Path, required=True, help="the tree under test")
    parser.add_argument("--folder", default="", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--write-1.3b", dest="write", type=Path, help="write the 1.3B-shaped checkpoint here")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    folder = args.folder
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_load import write_synthetic_checkpoint

        folder = str(write_synthetic_checkpoint(args.write, "1.3b"))
    before = os.getloadavg()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.runs):
        for side in ("old", "new"):
            result = run(getattr(args, side).resolve(), folder, args.tokens)
            runs[side].append(result)
            print(f"run {i + 1} {side}: load {result['load']:.3f} s (cpu {result['load_cpu']:.3f}), generate "
                  f"{result['generate']:.3f} s (cpu {result['generate_cpu']:.3f})", flush=True)
    after = os.getloadavg()
    print(f"\nmodel: {folder or 'bundled'}; {args.tokens} new tokens; 1 thread; median of {args.runs} (spread)")
    for key in ("load", "generate", "load_cpu", "generate_cpu"):
        old, new = ([r[key] for r in runs[s]] for s in ("old", "new"))
        print(f"{key:>12s}: old {statistics.median(old):.3f} s ({max(old) - min(old):.3f}), new "
              f"{statistics.median(new):.3f} s ({max(new) - min(new):.3f}), new/old "
              f"{statistics.median(new) / statistics.median(old):.2f}")
    total = {s: statistics.median([r["load"] + r["generate"] for r in runs[s]]) for s in runs}
    print(f"load+gen: old {total['old']:.3f} s, new {total['new']:.3f} s, new/old {total['new'] / total['old']:.2f}")
    print(f"loadavg (1, 5, 15 min): before {before}, after {after}")


if __name__ == "__main__":
    main()
