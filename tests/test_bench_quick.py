"""`make bench QUICK=1` runs every benchmark end to end: a benchmark script that no longer matches the library (a
moved module, a changed signature) fails here rather than an hour into a full run. Minutes, so slow."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
import run_all  # noqa: E402
from results_meta import QUICK_RESULTS, RESULTS  # noqa: E402


@pytest.mark.slow
def test_every_benchmark_runs_quick_and_leaves_the_committed_results_alone():
    committed = {path.name: path.read_bytes() for path in RESULTS.glob("*.json*")}
    started = time.time()
    done = subprocess.run([sys.executable, "evals/run_all.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((QUICK_RESULTS / "run_all.json").read_text())
    assert record["meta"]["mode"] == "quick" and not record["failed"]
    ran = [name for name, (_, quick) in run_all.BENCHMARKS.items() if quick]
    assert sorted(record["seconds"]) == sorted(ran)
    fresh = [path for path in QUICK_RESULTS.glob("bench_*.json") if path.stat().st_mtime >= started]
    assert len(fresh) == len(ran), [path.name for path in fresh]
    for path in fresh:
        assert json.loads(path.read_text())["meta"]["mode"] == "quick", path.name
    assert {path.name: path.read_bytes() for path in RESULTS.glob("*.json*")} == committed
