"""The gate's verdict: each measure of each precision against its baseline and tolerance, as a table, as
JSON for CI systems, and as the exit status (1 for a regression, 2 when the run is not comparable)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text
from .gate import DIGESTS, Baseline, Limits, Measurement, Tolerance
from .report import ComparisonReport


# -- the verdict ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One comparison. `change` and `allowed` are in the comparison's unit: relative for perplexity, nats per
    token for KL, percentage points for top-1, counts for the data; None for digests and presence."""

    precision: str  # a precision, or "data"
    measure: str  # perplexity | kl | top1 | state_dict | modules | gap_ratio | measured | total_tokens | ...
    baseline: Any
    now: Any
    change: float | None
    allowed: float | None
    passed: bool
    cells: tuple[str, str, str, str]  # baseline, now, change, allowed as the table prints them


MEASURE_NAMES = {"perplexity": "perplexity", "kl": "KL (nats/token)", "top1": "top-1 agreement",
                 "state_dict": "state-dict sha256", "modules": "module-settings sha256", "gap_ratio": "gap ratio",
                 "measured": "measured", "total_tokens": "text tokens", "windows": "windows",
                 "scored_tokens": "scored tokens"}


@dataclass
class Verdict:
    baseline: str
    checks: list[Check] = field(default_factory=list)
    unchecked: list[dict[str, str]] = field(default_factory=list)  # {"precision", "measure", "reason"}

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self, checks: Sequence[Check] | None = None) -> str:
        rows = self.failures if checks is None else checks
        lines = ["| precision | measure | baseline | now | change | allowed |", "|---|---|---|---|---|---|"]
        lines += [f"| {c.precision} | {MEASURE_NAMES.get(c.measure, c.measure)} | " + " | ".join(c.cells) + " |"
                  for c in rows]
        return "\n".join(lines)

    def unchecked_lines(self) -> list[str]:
        """One line per (measure, reason), naming the precisions it applies to."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for item in self.unchecked:
            grouped.setdefault((item["measure"], item["reason"]), []).append(item["precision"])
        return [f"not checked: data {m}: {reason}" if ps == ["data"] else
                f"not checked: {MEASURE_NAMES.get(m, m)} of {', '.join(ps)}: {reason}"
                for (m, reason), ps in grouped.items()]

    def format(self) -> str:
        """What `qopt eval --check` prints: the failing checks as a table, what was not checked, one summary."""
        lines = [self.table(), ""] if self.failures else []
        lines += self.unchecked_lines()
        if self.passed:
            lines.append(f"gate {self.baseline}: passed, {len(self.checks)} checks within tolerance")
        else:
            lines.append(f"gate {self.baseline}: FAILED, {len(self.failures)} of {len(self.checks)} checks beyond "
                         f"tolerance")
        return "\n".join(lines)

    def to_dict(self, measured: ComparisonReport | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"baseline": self.baseline, "passed": self.passed, "exit_code": 0 if self.passed else 1,
                                "failures": len(self.failures),
                                "checks": [{**asdict(c), "cells": dict(zip(("baseline", "now", "change", "allowed"),
                                                                           c.cells, strict=True))}
                                           for c in self.checks],
                                "unchecked": list(self.unchecked)}
        if measured is not None:
            data["measured"] = measured.to_dict()
        return data

    def save_json(self, path: str | os.PathLike, measured: ComparisonReport | None = None) -> None:
        _write_json(path, self.to_dict(measured))


def error_verdict(path: str | os.PathLike, baseline: str, error: BaseException) -> None:
    """The --json verdict of a gate that could not compare (exit 2): missing baseline, other data files."""
    _write_json(path, {"baseline": baseline, "passed": False, "exit_code": 2, "error": str(error), "checks": [],
                       "unchecked": []})


def _write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _relative(now: float, base: float) -> float:
    return (now - base) / base if base else (0.0 if now == base else math.inf)


def check_baseline(run: Measurement, baseline: Baseline, tolerance: Tolerance | Limits | float | None = None
                   ) -> Verdict:
    """Compare a re-run with its baseline: the token counts, then per precision perplexity, KL, top-1 and the
    digests, each against `tolerance` (default: the baseline's), and the calibrated gap-ratio claim."""
    tolerance = baseline.tolerance if tolerance is None else Tolerance.coerce(tolerance)
    verdict = Verdict(baseline.path)
    base, now = baseline.report, run.report
    for measure, b, n in (("total_tokens", base.total_tokens, now.total_tokens), ("windows", base.windows, now.windows),
                          ("scored_tokens", base.tokens, now.tokens)):
        verdict.checks.append(Check("data", measure, b, n, n - b, 0, n == b, (f"{b:,}", f"{n:,}", f"{n - b:+,}",
                                                                             "equal")))
    if baseline.files is None:
        verdict.unchecked.append({"precision": "data", "measure": "files", "reason": "the baseline (format 1) "
                                  "records no file hashes; another text or tokenizer shows only in the token counts"})
    ran = set(now.settings.get("precisions", [])) if not run.stopped else set()
    for row in base.rows:
        name = row.precision
        if name not in ran:
            verdict.unchecked.append({"precision": name, "measure": "all",
                                      "reason": run.stopped or "not run (--precisions)"})
            continue
        verdict.checks.extend(_row_checks(row, now.row(name), run.digests.get(name), baseline, tolerance, verdict))
    if tolerance.max_gap_ratio is not None and not run.stopped:
        verdict.checks.extend(_gap_checks(run.report, baseline.report, tolerance.max_gap_ratio, ran))
    return verdict


def _row_checks(base: Any, row: Any, digests: dict[str, str] | None, baseline: Baseline, tolerance: Tolerance,
                verdict: Verdict) -> list[Check]:
    name = base.precision
    limits = tolerance.limits(name)
    if row is None:
        return [Check(name, "measured", "yes", "no", None, None, False, ("ran", "missing", "", "present"))]
    checks = []

    def skip(measure: str, reason: str) -> None:
        verdict.unchecked.append({"precision": name, "measure": measure, "reason": reason})

    if limits.ppl is None:
        skip("perplexity", "no tolerance")
    else:
        moved = _relative(row.ppl, base.ppl)
        checks.append(Check(name, "perplexity", base.ppl, row.ppl, moved, limits.ppl, abs(moved) <= limits.ppl,
                            (f"{base.ppl:.4f}", f"{row.ppl:.4f}", f"{moved:+.3%}", f"±{limits.ppl:.2%}")))
    if base.kl is not None:
        if limits.kl is None:
            skip("kl", f"no KL tolerance in the baseline (format {baseline.format}); --kl-tolerance sets one")
        elif row.kl is None:
            skip("kl", f"its reference ({base.reference}) was not run (--precisions)")
        else:
            allowed = limits.kl_allowed(base.kl)
            moved = row.kl - base.kl
            shown = f"±{allowed / base.kl:.1%}" if base.kl else f"±{allowed:.1e}"
            checks.append(Check(name, "kl", base.kl, row.kl, moved, allowed, abs(moved) <= allowed,
                                (f"{base.kl:.4e}", f"{row.kl:.4e}", f"{_relative(row.kl, base.kl):+.1%}", shown)))
    if base.top1 is not None:
        if limits.top1 is None:
            skip("top1", f"no top-1 tolerance in the baseline (format {baseline.format}); --top1-tolerance sets one")
        elif row.top1 is None:
            skip("top1", f"its reference ({base.reference}) was not run (--precisions)")
        else:
            points = 100 * (row.top1 - base.top1)
            checks.append(Check(name, "top1", base.top1, row.top1, points, limits.top1, abs(points) <= limits.top1,
                                (f"{base.top1:.2%}", f"{row.top1:.2%}", f"{points:+.2f} pt", f"±{limits.top1:.2f} pt")))
    recorded = baseline.digests.get(name)
    if recorded is None:
        skip("digest", "not recorded in the baseline" + (" (format 1)" if baseline.format == 1 else ""))
        return checks
    for kind in DIGESTS:
        if kind not in limits.digests:
            noisy = ((baseline.noise or {}).get("spread", {}).get(name, {}).get("digests_identical", {})
                     .get(kind) is False)
            skip(kind, "not pinned: it differed between the baseline's noise runs" if noisy else
                 "not pinned by the tolerance (--no-digest, or the baseline's)")
            continue
        b, n = recorded[kind], (digests or {}).get(kind, "none")
        checks.append(Check(name, kind, b, n, None, None, b == n,
                            (b[:12], n[:12], "same" if b == n else "differs", "identical")))
    return checks


def _gap_checks(measured: ComparisonReport, baseline: ComparisonReport, max_ratio: float, ran: set[str]
                ) -> list[Check]:
    """Each calibrated precision the baseline has a gap ratio for (and that ran with its preset) keeps its gap at
    most `max_ratio` x the round-to-nearest gap."""
    ratios = measured.gap_ratios()
    checks = []
    for name, (base_ratio, _, _) in baseline.gap_ratios().items():
        preset = name[: -len("-calibrated")]
        if name not in ran or preset not in ran:
            continue
        if name not in ratios:
            checks.append(Check(name, "gap_ratio", base_ratio, None, None, max_ratio, False,
                                (f"{base_ratio:.2f}", "none", "round-to-nearest shows no positive gap",
                                 f"<= {max_ratio:g}")))
            continue
        ratio, gap, rtn_gap = ratios[name]
        checks.append(Check(name, "gap_ratio", base_ratio, ratio, ratio - base_ratio, max_ratio, ratio <= max_ratio,
                            (f"{base_ratio:.2f}", f"{ratio:.2f} ({gap:+.4f} / {rtn_gap:+.4f})",
                             f"{ratio - base_ratio:+.2f}", f"<= {max_ratio:g}")))
    return checks
