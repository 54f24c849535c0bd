"""docs/benchmarks.md's tables are what evals/render_tables.py renders from the committed results JSONs: a table
edited by hand, or a JSON changed without re-rendering, fails here."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
import render_tables  # noqa: E402


def test_every_marked_table_matches_its_json():
    text = render_tables.DOC.read_text()
    names = [m.group(2) for m in render_tables.MARKER.finditer(text)]
    assert sorted(names) == sorted(render_tables.TABLES), "each renderer has exactly one table in the doc"
    assert render_tables.differences(text) == [], "python evals/render_tables.py --write"


def test_a_figure_edited_by_hand_is_caught():
    text = render_tables.DOC.read_text()
    table = text.index("<!-- table: finetune -->")
    ratio = re.compile(r"\| (\d+\.\d+)x / ").search(text, table)
    assert ratio, "the finetune table shows its speed ratios"
    edited = text[:ratio.start(1)] + f"{float(ratio.group(1)) + 0.5:.2f}" + text[ratio.end(1):]
    assert edited != text
    assert render_tables.differences(edited) == ["finetune"]


def _replace_json(monkeypatch, name: str, data) -> None:
    """render_tables reads `data` in place of results/NAME (None: as if the file were absent)."""
    original = render_tables._json
    monkeypatch.setattr(render_tables, "_json", lambda wanted, folder=render_tables.RESULTS:
                        data if wanted == name else original(wanted, folder))


def test_a_changed_json_changes_its_table(monkeypatch):
    data = json.loads((render_tables.RESULTS / "bench_finetune_125m.json").read_text())
    data["medians"]["ours"]["step_s"] *= 2
    _replace_json(monkeypatch, "bench_finetune_125m.json", data)
    assert render_tables.differences(render_tables.DOC.read_text()) == ["finetune"]


def test_quick_runs_never_render():
    assert render_tables._full({"meta": {"mode": "quick"}}) is None
    assert render_tables._full({"meta": {"mode": "full"}}) is not None


def test_the_committed_tables_come_from_a_full_run():
    text = render_tables.DOC.read_text()
    for match in render_tables.MARKER.finditer(text):
        assert render_tables.NYM not in render_tables.TABLES[match.group(2)](), match.group(2)


@pytest.mark.parametrize("name", ["bench_decode.json", "bench_load.json", "bench_offload.json"])
def test_a_table_without_a_full_run_says_not_yet_measured(name, monkeypatch):
    _replace_json(monkeypatch, name, None)
    table = {"bench_decode.json": render_tables.decode, "bench_load.json": render_tables.load,
             "bench_offload.json": render_tables.offload_generate}[name]()
    assert render_tables.NYM in table


def test_quick_results_go_to_the_ignored_folder_and_full_ones_are_committed():
    import subprocess

    import results_meta

    assert results_meta.results_path("bench_decode", quick=True).parent == results_meta.QUICK_RESULTS
    assert results_meta.results_path("bench_decode", quick=False).parent == render_tables.RESULTS
    ignored = subprocess.run(["git", "check-ignore", "-q", "evals/results/quick/bench_decode.json"], cwd=ROOT)
    assert ignored.returncode == 0, "evals/results/quick/ must be git-ignored"


def test_every_results_json_records_the_machine_and_code():
    import results_meta

    record = results_meta.meta("quick", 1, shape="125m")
    for key in ("mode", "git_commit", "cpu_model", "cpu_flags", "threads", "versions", "load_average_start"):
        assert key in record, key
    assert {"torch", "bitsandbytes", "transformers", "peft"} <= set(record["versions"])
    assert record["settings"] == {"shape": "125m"}
