"""The precision comparison's record: one row per precision (perplexity, drift from its reference, memory),
printed as a markdown table, saved as JSON, plotted as perplexity against weight memory.

A precision named "<preset>-calibrated" (e.g. "nf4-calibrated") is that preset with GPTQ rounding, so
`gap_ratios` sets each calibrated gap beside its round-to-nearest preset's.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..bundled import BUNDLED, bundled_model_dir
from ..io.atomic import atomic_write_text
from ..utils import FLOAT_DTYPES
from .precisions import UNQUANTIZED_NAMES, split_calibrated

UNQUANTIZED = {name: FLOAT_DTYPES[name] for name in UNQUANTIZED_NAMES}  # precision name -> dtype


# -- the comparison ------------------------------------------------------------------------------------------
def model_label(model_path: str | os.PathLike) -> str:
    """How a baseline names its model: "bundled" for the model that ships with qopt, else the path given."""
    path = Path(model_path)
    return BUNDLED if path.exists() and path.resolve() == bundled_model_dir().resolve() else str(model_path)


@dataclass
class PrecisionRow:
    precision: str
    ppl: float
    nll: float
    seconds: float
    load_seconds: float
    weight_bytes: int
    params: int
    bits_per_param: float
    linear_bits_per_param: float
    reference: str | None = None
    delta: float | None = None  # ppl - reference ppl
    delta_rel: float | None = None
    kl: float | None = None
    top1: float | None = None
    ram_bytes: int | None = None  # of weight_bytes, what sat in RAM, where it is not all of them (offloaded layers)


@dataclass
class ComparisonReport:
    model: str
    settings: dict[str, Any]  # precisions, seqlen, stride, windows (the max_windows prefix or None), reference
    total_tokens: int
    windows: int
    tokens: int
    rows: list[PrecisionRow] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, precision: str) -> PrecisionRow | None:
        return next((r for r in self.rows if r.precision == precision), None)

    def to_dict(self) -> dict[str, Any]:
        data = {"model": self.model, "settings": self.settings, "data": {
            "text": "WikiText-2 raw test, rows joined with \\n\\n", "total_tokens": self.total_tokens,
            "windows": self.windows, "scored_tokens": self.tokens},
            "rows": [{k: v for k, v in asdict(r).items() if k != "ram_bytes" or v is not None} for r in self.rows],
            "environment": self.environment}
        ratios = self.gap_ratios()
        if ratios:
            data["gap_ratios"] = {name: {"ratio": ratio, "gap": gap, "rtn_gap": rtn_gap}
                                  for name, (ratio, gap, rtn_gap) in ratios.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonReport:
        return cls(model=data["model"], settings=dict(data["settings"]), total_tokens=data["data"]["total_tokens"],
                   windows=data["data"]["windows"], tokens=data["data"]["scored_tokens"],
                   rows=[PrecisionRow(**r) for r in data["rows"]], environment=dict(data.get("environment", {})))

    def to_markdown(self) -> str:
        head = ("| precision | perplexity | Δ vs ref | ref | KL (nats/token) | top-1 agree | weight MB "
                "| bits/param linear | bits/param model | forward s |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            delta = "" if r.delta is None else f"{r.delta:+.3f} ({r.delta_rel:+.2%})"
            kl = "" if r.kl is None else f"{r.kl:.5f}"
            top1 = "" if r.top1 is None else f"{r.top1:.2%}"
            lines.append(f"| {r.precision} | {r.ppl:.3f} | {delta} | {r.reference or ''} | {kl} | {top1} | "
                         f"{r.weight_bytes / 1e6:.2f} | {r.linear_bits_per_param:.2f} | {r.bits_per_param:.2f} | "
                         f"{r.seconds:.1f} |")
        for r in self.rows:
            if r.ram_bytes is not None:
                lines.append(f"\n{r.precision}: {r.weight_bytes / 1e6:.2f} MB of weights, {r.ram_bytes / 1e6:.2f} MB "
                             f"of them in RAM (the rest on the GPU or on disk)")
        ratios = self.gap_ratios()
        for row, rtn in self._calibrated_pairs():
            if row.precision in ratios:
                ratio, gap, rtn_gap = ratios[row.precision]
                lines.append(f"\n{row.precision}: gap {gap:+.3f} vs round-to-nearest {rtn_gap:+.3f}: ratio {ratio:.2f}")
            else:
                lines.append(f"\n{row.precision}: gap {row.delta:+.3f} vs round-to-nearest {rtn.delta:+.3f}: no ratio "
                             f"(round-to-nearest costs nothing measurable on these windows)")
        return "\n".join(lines)

    def _calibrated_pairs(self) -> list[tuple[PrecisionRow, PrecisionRow]]:
        """(calibrated row, its round-to-nearest preset's row) for each pair measured against a reference."""
        pairs = []
        for row in self.rows:
            preset, calibrated = split_calibrated(row.precision)
            rtn = self.row(preset)
            if calibrated and rtn is not None and row.delta is not None and rtn.delta is not None:
                pairs.append((row, rtn))
        return pairs

    def gap_ratios(self) -> dict[str, tuple[float, float, float]]:
        """Calibrated precision -> (its gap / the round-to-nearest gap, its gap, that gap), where round-to-nearest
        has a positive gap to shrink (at or below zero the ratio means nothing)."""
        return {row.precision: (row.delta / rtn.delta, row.delta, rtn.delta)
                for row, rtn in self._calibrated_pairs() if rtn.delta > 0}

    def save_json(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=2) + "\n")

    def save_plot(self, path: str | os.PathLike) -> None:
        """Perplexity against weight memory, one point per precision named in a legend (points of one format
        sit at the same memory, where labels beside them would collide); Agg canvas, no pyplot state."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.6, 4.4), dpi=120)
        ax = fig.add_subplot()
        for r in sorted(self.rows, key=lambda r: r.ppl):
            marker = "*" if split_calibrated(r.precision)[1] else "D" if r.precision in UNQUANTIZED else "o"
            ax.scatter(r.weight_bytes / 1e6, r.ppl, s=70 if marker == "*" else 36, marker=marker,
                       label=f"{r.precision}: {r.ppl:.3f}")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False,
                  title="perplexity", title_fontsize=8)
        ax.set_xlabel("weight memory (MB)")
        ax.set_ylabel("WikiText-2 perplexity")
        name = Path(model_label(self.model)).name
        ax.set_title(f"{name}: {self.windows} windows of {self.settings['seqlen']} tokens", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
