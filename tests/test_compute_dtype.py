"""The compute dtype of quantized models is decided for the machine at run time, and the gate keeps its
baseline's (so a gate reruns bit-identically on a machine whose default differs)."""
from pathlib import Path

import pytest
import torch

from qopt.evaluation import gate, precisions
from qopt.evaluation.compare import _run_order


def test_fast_bf16_flags_give_bf16_and_their_absence_fp32(tmp_path, monkeypatch):
    monkeypatch.delenv("QOPT_QUANTIZED_COMPUTE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    without.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert precisions.quantized_compute(with_bf16) == "bf16"
    assert precisions.quantized_compute(without) == "fp32"
    assert precisions.quantized_compute(tmp_path / "missing") == "fp32"
    (tmp_path / "c").write_text("flags : amx_bf16 amx_tile\n")
    assert precisions.quantized_compute(tmp_path / "c") == "bf16"


def test_override_and_its_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QOPT_QUANTIZED_COMPUTE", "fp32")
    assert precisions.quantized_compute(tmp_path / "missing") == "fp32"
    monkeypatch.setenv("QOPT_QUANTIZED_COMPUTE", "fp16")
    with pytest.raises(ValueError, match="QOPT_QUANTIZED_COMPUTE='fp16': expected bf16 or fp32"):
        precisions.quantized_compute()


def test_the_reference_of_a_quantized_precision_is_its_compute_dtype():
    assert _run_order(["nf4"], True, compute="fp32") == ["fp32", "nf4"]
    assert _run_order(["nf4"], True, compute="bf16") == ["bf16", "nf4"]
    assert precisions.reference_for("nf4", ["fp32", "nf4"], "fp32") == "fp32"


@pytest.mark.parametrize("recorded, expected", [({"compute": "fp32"}, "fp32"), ({}, "bf16")])
def test_the_gate_reruns_in_its_baselines_compute_dtype(recorded, expected, monkeypatch):
    baseline = gate.read_baseline(Path(__file__).resolve().parents[1] / "evals/baselines/gate.json")
    assert baseline.report.settings["compute"] == "bf16"  # the committed gate records what it ran in
    settings = {k: v for k, v in baseline.report.settings.items() if k != "compute"} | recorded
    baseline.report.settings = settings
    seen = {}
    monkeypatch.setattr(gate, "check_files", lambda *a: {})
    monkeypatch.setattr(gate, "measure", lambda *a, **k: seen.update(k) or gate.Measurement(baseline.report))
    monkeypatch.setenv("QOPT_QUANTIZED_COMPUTE", "fp32" if expected == "bf16" else "bf16")  # the machine differs
    gate.rerun_baseline(baseline, progress=False)
    assert seen["compute"] == expected
