"""The perplexity regression gate: a baseline is a comparison report plus what it allows (`Tolerance`);
`check_baseline` re-runs its settings and lists what moved.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..bundled import bundled_model_dir
from .compare import compare_precisions
from .report import BUNDLED, ComparisonReport, model_label

DEFAULT_TOLERANCE = 0.01
BASELINE_FORMAT = 1


# -- the regression gate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """What a baseline allows: each perplexity within ±`relative`, and optionally every calibrated precision's
    gap at most `max_gap_ratio` times its round-to-nearest preset's gap (a claim the gate keeps true)."""
    relative: float = DEFAULT_TOLERANCE
    max_gap_ratio: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.relative < 1:
            raise ValueError(f"tolerance {self.relative}: expected a relative tolerance between 0 and 1 (e.g. 0.01)")
        if self.max_gap_ratio is not None and not self.max_gap_ratio > 0:
            raise ValueError(f"max_gap_ratio {self.max_gap_ratio}: expected a positive ratio (e.g. 0.5)")

    @classmethod
    def coerce(cls, value: "Tolerance | float") -> "Tolerance":
        """A Tolerance as given, or a bare relative tolerance wrapped in one."""
        return value if isinstance(value, cls) else cls(value)

    def describe(self) -> str:
        ratio = "" if self.max_gap_ratio is None else f", calibrated gap <= {self.max_gap_ratio:g} x round-to-nearest"
        return f"±{self.relative:.2%}{ratio}"


def write_baseline(report: ComparisonReport, path: str | os.PathLike, tolerance: Tolerance | float = Tolerance()
                   ) -> None:
    """A report plus what the gate allows; its settings are what `check_baseline` re-runs."""
    tolerance = Tolerance.coerce(tolerance)
    if tolerance.max_gap_ratio is not None and not report.gap_ratios():
        raise ValueError("max_gap_ratio needs a calibrated precision and its round-to-nearest preset in the run "
                         "(e.g. nf4 and nf4-calibrated)")
    limits = {"relative": tolerance.relative}
    if tolerance.max_gap_ratio is not None:
        limits["max_gap_ratio"] = tolerance.max_gap_ratio
    data = {"format": BASELINE_FORMAT, "tolerance": limits}
    replace(report, model=model_label(report.model)).save_json(path, extra=data)


def read_baseline(path: str | os.PathLike) -> tuple[ComparisonReport, Tolerance]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such baseline file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON baseline ({err})") from None
    if data.get("format") != BASELINE_FORMAT:
        raise ValueError(f"{path}: field 'format' is {data.get('format')!r}, expected {BASELINE_FORMAT}")
    try:
        limits = data["tolerance"]
        relative = float(limits["relative"])
        ratio = limits.get("max_gap_ratio")
        ratio = None if ratio is None else float(ratio)
        report = ComparisonReport.from_dict(data)
        missing = [k for k in ("precisions", "seqlen") if k not in report.settings]
        if missing:
            raise KeyError(f"settings.{missing[0]}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: malformed baseline (missing or bad field {err})") from None
    try:
        return report, Tolerance(relative, ratio)
    except ValueError as err:
        raise ValueError(f"{path}: field 'tolerance': {err}") from None


def baseline_model_path(baseline: ComparisonReport) -> str:
    return str(bundled_model_dir()) if baseline.model == BUNDLED else baseline.model


def rerun_baseline(baseline: ComparisonReport, model_path: str | os.PathLike | None = None,
                   progress: bool = True, **options: Any) -> ComparisonReport:
    """The baseline's exact settings (precisions, seqlen, stride, window prefix, references) run again;
    `options` (placement, adapter) go to `compare_precisions`."""
    s = baseline.settings
    return compare_precisions(model_path or baseline_model_path(baseline), s["precisions"], s["seqlen"],
                              s.get("windows"), s.get("stride"), reference=s.get("reference", True),
                              progress=progress, **options)


def check_baseline(measured: ComparisonReport, baseline: ComparisonReport, tolerance: Tolerance | float
                   ) -> list[str]:
    """One line per violation: a perplexity outside baseline * (1 ± relative), a changed token count, or a
    calibrated gap above max_gap_ratio x its round-to-nearest gap."""
    tolerance = Tolerance.coerce(tolerance)
    problems = []
    if (measured.windows, measured.tokens) != (baseline.windows, baseline.tokens):
        problems.append(f"data: {measured.windows} windows / {measured.tokens:,} scored tokens, baseline "
                        f"{baseline.windows} / {baseline.tokens:,} (tokenizer or text changed)")
    for base in baseline.rows:
        row = measured.row(base.precision)
        if row is None:
            problems.append(f"{base.precision}: not measured (baseline {base.ppl:.4f})")
            continue
        moved = (row.ppl - base.ppl) / base.ppl
        if not abs(moved) <= tolerance.relative:  # also catches NaN
            problems.append(f"{base.precision}: perplexity {row.ppl:.4f} vs baseline {base.ppl:.4f} "
                            f"({moved:+.2%}), tolerance ±{tolerance.relative:.2%}")
    if tolerance.max_gap_ratio is not None:
        ratios = measured.gap_ratios()
        for name in baseline.gap_ratios():
            if name not in ratios:
                problems.append(f"{name}: its round-to-nearest preset no longer shows a positive gap (or did not "
                                f"run), so the ratio cannot be checked")
                continue
            ratio, gap, rtn_gap = ratios[name]
            if not ratio <= tolerance.max_gap_ratio:
                problems.append(f"{name}: gap {gap:+.4f} is {ratio:.2f} x round-to-nearest's {rtn_gap:+.4f}, "
                                f"allowed {tolerance.max_gap_ratio:g} x")
    return problems
