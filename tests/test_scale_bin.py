"""Scale: an OPT-6.7B-shaped checkpoint in four zip `.bin` shards (the real repo has two, which would make the disk
bound vacuous), loaded by Hub id from the stand-in with keep_download=False, the path evals/bench_scale.py runs
at 30B and 66B. The stand-in generates every byte on request (evals/scale_shards.py); the manifest of sizes and
sha256 is cached under ~/.cache/qopt-bench after the first run."""
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
SLACK = 1.01  # the peak-disk sample counts 4 KiB blocks and the HF cache's small files beside the shards


@pytest.mark.slow
def test_opt_6_7b_four_bin_shards_stream_from_the_hub_within_ram_and_disk_bounds(tmp_path):
    sys.path[:0] = [str(ROOT / "evals"), str(ROOT / "tests")]
    from bench_scale import Server, child
    from hub_server import hub_environment
    from scale_shards import build

    shape = os.environ.get("QOPT_SCALE_TEST_SHAPE", "opt-6.7b")  # a smaller shape checks the test itself
    sizes = [e["size"] for e in build(shape, 4, progress=False).manifest["shards"]]
    two = max(a + b for a, b in zip(sizes, sizes[1:], strict=False))
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    server = Server(shape, 4, 0)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               **hub_environment(server, cache), "TMPDIR": str(scratch)}
        began = time.perf_counter()
        result = child(["load", f"facebook/{shape}", shape, str(tmp_path / "unused"), ""], env, [cache, scratch])
        seconds = time.perf_counter() - began
    finally:
        server.close()
    assert "failed" not in result, result
    load = result["load"]
    assert load["placement"] == ["cpu"]
    assert load["peak_anon"] <= load["model_bytes"] + 1.5 * GIB, (load["peak_anon"], load["model_bytes"])
    assert result["peak_disk"] <= SLACK * two, (result["peak_disk"], two)
    assert result["download_plan"]["peak_disk_bytes"] == two  # the plan's bound is the same pair of shards
    assert not any(scratch.iterdir()), "the scratch folder outlived the load"
    assert seconds <= 360, f"{shape} load took {seconds:.0f} s"
