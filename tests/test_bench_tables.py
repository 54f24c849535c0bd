"""docs/benchmarks.md's tables are what evals/render_tables.py renders from the committed results JSONs: a table
edited by hand, or a JSON changed without re-rendering, fails here."""
import json
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
    edited = text.replace("| 1.96x / ", "| 2.10x / ", 1)
    assert edited != text
    assert render_tables.differences(edited) == ["finetune"]


def test_a_changed_json_changes_its_table(tmp_path, monkeypatch):
    data = json.loads((render_tables.RESULTS / "bench_finetune_125m.json").read_text())
    data["medians"]["ours"]["step_s"] *= 2
    (tmp_path / "bench_finetune_125m.json").write_text(json.dumps(data))
    original = render_tables._json
    monkeypatch.setattr(render_tables, "_json", lambda name, folder=render_tables.RESULTS:
                        original(name, tmp_path if name == "bench_finetune_125m.json" else folder))
    assert render_tables.differences(render_tables.DOC.read_text()) == ["finetune"]


def test_quick_runs_never_render():
    assert render_tables._full({"meta": {"mode": "quick"}}) is None
    assert render_tables._full({"meta": {"mode": "full"}}) is not None


@pytest.mark.parametrize("name", ["bench_decode.json", "bench_load.json", "bench_offload.json"])
def test_a_table_without_a_full_run_says_not_yet_measured(name):
    if (render_tables.RESULTS / name).exists():
        pytest.skip(f"{name} is committed: its table renders measured figures")
    table = {"bench_decode.json": render_tables.decode, "bench_load.json": render_tables.load,
             "bench_offload.json": render_tables.offload_generate}[name]()
    assert render_tables.NYM in table
