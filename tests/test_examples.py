"""The scripts in examples/ run as a user would run them (fresh process, any working directory) and say what
their docstrings promise."""
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_shows_4bit_is_smaller(tmp_path):
    sizes = {m[0]: float(m[1]) for m in re.findall(r"(fp32|nf4):\s+([\d.]+) MiB", run_example("quickstart",
                                                                                            tmp_path=tmp_path))}
    assert set(sizes) == {"fp32", "nf4"} and sizes["nf4"] < sizes["fp32"] / 2


def test_offload_runs_layers_from_disk_with_equal_logits(tmp_path):
    out = run_example("offload", tmp_path=tmp_path)
    assert "on disk ['model.decoder.layers." in out and "logits equal to the in-memory model: True" in out


def test_qlora_trains_saves_and_reloads_an_adapter(tmp_path):
    out = run_example("qlora", "2", tmp_path=tmp_path)
    assert "2 steps" in out and "with the adapter: The river" in out


def test_calibrate_cuts_the_drift_from_bf16(tmp_path):
    out = run_example("calibrate", "2", tmp_path=tmp_path)
    ratio = float(re.search(r"calibrated [\d.e+-]+ \(([\d.]+)x\)", out).group(1))
    assert ratio < 1
