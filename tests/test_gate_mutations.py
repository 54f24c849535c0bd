"""Mutation tests of the regression gate: each fault injected into qopt must make `qopt eval --check
evals/baselines/gate.json --precisions ...` exit 1, and the unmodified code must pass it (exit 0).

A fault is a module attribute and its replacement (a Python expression; `original` is the value it replaces),
applied by tests/gate_fault.py in a fresh process before the command runs: the tokenized text and the
quantizer tables are cached per process. Retarget a row if its code moves. `must_fail` names the checks of the
verdict (--json) each fault has to fail, so a fault caught only by accident (another check) is noticed too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "evals" / "baselines" / "gate.json"
NF4_AS_FP4 = "{**original, 'nf4': {**original['nf4'], 'bnb_4bit_quant_type': 'fp4'}}"
INT8_THRESHOLD_0 = "{**original, 'int8': {**original['int8'], 'llm_int8_threshold': 0.0}}"
RTN_INSTEAD_OF_CALIBRATION = ("lambda source, windows=None, config=None, *, progress=True: (qopt.load(source, "
                              "quantization=config.quantization, torch_dtype=config.dtype, progress=False), None)")

FAULTS = {  # name: (precisions to run, module, attribute, replacement, checks that must fail)
    "nf4 preset quantizes as FP4":
        (["nf4"], "qopt.quant.config", "PRESETS", NF4_AS_FP4,
         {("nf4", "kl"), ("nf4", "top1"), ("nf4", "state_dict"), ("nf4", "modules")}),
    "4-bit blocksize 64 -> 128":
        (["nf4"], "qopt.quant.modules", "BLOCKSIZE", "128", {("nf4", "kl"), ("nf4", "state_dict"), ("nf4", "modules")}),
    "double-quant statistics not kept: saved from the bf16 absmax after the CPU repack":
        (["nf4-dq"], "qopt.quant.modules", "Linear4bit.remember_statistics", "lambda self: None",
         {("nf4-dq", "state_dict")}),
    "LLM.int8 outlier threshold 6 -> 0":
        (["int8"], "qopt.quant.config", "PRESETS", INT8_THRESHOLD_0, {("int8", "modules")}),
    "calibrated preset falls back to round-to-nearest":
        (["nf4-calibrated"], "qopt.evaluation.compare", "calibrate", RTN_INSTEAD_OF_CALIBRATION,
         {("nf4-calibrated", "kl"), ("nf4-calibrated", "top1")}),
    "WikiText-2 rows joined with one newline":
        (["nf4"], "qopt.evaluation.perplexity", "WIKITEXT_JOIN", "'\\n'", {("data", "total_tokens")}),
}
UNMODIFIED = sorted({p for precisions, *_ in FAULTS.values() for p in precisions})


def gate(tmp_path: Path, precisions: list[str], fault: tuple[str, str, str] = ("-", "-", "-")
         ) -> tuple[int, dict, str]:
    """(exit status, the --json verdict, stdout) of the gate run with `fault` injected."""
    verdict = tmp_path / "verdict.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(ROOT / "tests" / "gate_fault.py"), *fault, "eval", "--check", str(BASELINE),
           "--precisions", *precisions, "--json", str(verdict)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, json.loads(verdict.read_text()), done.stdout


def margins(verdict: dict, precisions: list[str]) -> str:
    """The faulted precisions' checks and every failed one: change against what is allowed (-s shows them)."""
    lines = []
    for c in verdict["checks"]:
        if not c["passed"] or c["precision"] in precisions:
            cells = c["cells"]
            lines.append(f"  {'FAIL' if not c['passed'] else 'ok  '} {c['precision']} {c['measure']}: "
                         f"{cells['baseline']} -> {cells['now']} ({cells['change']}, allowed {cells['allowed']})")
    return "\n".join(lines)


@pytest.mark.slow
def test_the_unmodified_code_passes_the_gate(tmp_path):
    status, verdict, out = gate(tmp_path, UNMODIFIED)
    assert status == 0, out
    checked = {(c["precision"], c["measure"]) for c in verdict["checks"]}
    assert {(p, m) for p in UNMODIFIED for m in ("perplexity", "kl", "top1", "modules")} <= checked


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAULTS))
def test_an_injected_fault_fails_the_gate(name, tmp_path):
    precisions, module, attribute, replacement, must_fail = FAULTS[name]
    status, verdict, out = gate(tmp_path, precisions, (module, attribute, replacement))
    print(f"{name}:\n{margins(verdict, precisions)}")
    assert status == 1, out
    failed = {(c["precision"], c["measure"]) for c in verdict["checks"] if not c["passed"]}
    assert must_fail <= failed, f"{name}: expected {sorted(must_fail)} among the failures, got {sorted(failed)}"
