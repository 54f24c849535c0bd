"""The precision comparison and the perplexity regression gate: what each precision costs and what it loses.

`compare_precisions` loads one checkpoint at each precision and measures WikiText-2 perplexity (qopt.evaluation),
the drift from a reference in the same compute dtype (KL, top-1 agreement) and the bytes the weights occupy;
the report prints as a markdown table, saves as JSON and plots perplexity against weight memory. A precision
named "<preset>-calibrated" (e.g. "nf4-calibrated") is that preset with GPTQ rounding (qopt.calibration, the
shipped calibration sample, fixed seed), so round-to-nearest and calibrated weights are judged in one run
against the same reference; `gap_ratios` sets their gaps side by side. A baseline is
such a report plus a `Tolerance`: `check_baseline` re-runs its settings and lists what moved.
"""
from __future__ import annotations

import gc
import io
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .evaluation import describe_windows, evaluate_ids, plan_windows, text_ids

UNQUANTIZED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8", "nf4", "fp4", "nf4-dq")
CALIBRATED = "-calibrated"  # suffix: the preset before it, rounded with GPTQ on calibration data
QUANTIZED_COMPUTE = "bf16"  # quantized models compute in bf16 here, so bf16 is their reference (DECISIONS 8b)
DEFAULT_TOLERANCE = 0.01
BASELINE_FORMAT = 1


# -- weight memory -------------------------------------------------------------------------------------------
def _bnb_linear_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def _walk(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a module attribute: quant states, int8 states, containers; never other modules.

    Generic on purpose: whatever a quantized layer keeps beside its weight (bitsandbytes' absmax and nested
    statistics, the original statistics kept across the CPU repack, the int8 row scales) is memory it holds.
    """
    if depth > 8 or obj is None or isinstance(obj, nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        for name, value in vars(obj).items():  # Params4bit.quant_state, Int8Params.CB / SCB, ...
            if name != "module":
                yield from _walk(value, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value, depth + 1)
    elif type(obj).__name__ == "QuantState":
        yield from _walk(vars(obj), depth + 1)
    elif type(obj).__name__ == "MatmulLtState":  # only the weights: idx / outlier pool describe activations
        yield from _walk([obj.CB, obj.SCB], depth + 1)


def _module_tensors(module: nn.Module, skip: tuple[str, ...] = ()) -> Iterator[torch.Tensor]:
    for name, value in vars(module).items():
        if name == "_modules" or name in skip:
            continue
        if name in ("_parameters", "_buffers"):
            value = {k: v for k, v in value.items() if k not in skip}
        yield from _walk(value)


def _storage_bytes(tensors: Iterator[torch.Tensor], seen: dict[int, int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights and int8 CB/weight aliases count once)."""
    seen = {} if seen is None else seen
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in seen:
            continue
        seen[ptr] = storage.nbytes()
        total += seen[ptr]
    return total


def _logical_numel(param: torch.Tensor) -> int:
    """Elements of the original weight: a 4-bit Params4bit stores two per byte, its quant_state knows."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and state.shape is not None else param.numel()


@dataclass(frozen=True)
class Footprint:
    """Bytes of weights as they are held now, and the parameter counts the bits are spread over."""

    bytes: int
    params: int
    linear_bytes: int
    linear_params: int
    linear_layers: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def linear_bits_per_param(self) -> float:
        return 8 * self.linear_bytes / self.linear_params if self.linear_params else float("nan")


def weight_footprint(model: nn.Module) -> Footprint:
    """Parameters + buffers as stored, quantized storage counted with its statistics, in either 4-bit state.

    Linear layers are the bitsandbytes ones where the model has any, otherwise every nn.Linear except an
    output head tied to the embedding; their bits exclude biases (which stay 16/32-bit everywhere). Weights
    offloaded to disk (meta tensors here) are not counted: this is what the model holds in memory.
    """
    seen: dict[int, int] = {}
    total = sum(_storage_bytes(_module_tensors(m), seen) for m in model.modules())
    params = sum(_logical_numel(p) for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    quantized = [m for m in model.modules() if isinstance(m, _bnb_linear_types())]
    if quantized:
        linears = quantized
    else:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings]
    linear_bytes = sum(_storage_bytes(_module_tensors(m, skip=("bias",))) for m in linears)
    linear_params = sum(_logical_numel(m.weight) for m in linears)
    return Footprint(total, params, linear_bytes, linear_params, len(linears))


# -- the comparison ------------------------------------------------------------------------------------------
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
            "rows": [asdict(r) for r in self.rows], "environment": self.environment}
        ratios = self.gap_ratios()
        if ratios:
            data["gap_ratios"] = {name: {"ratio": ratio, "gap": gap, "rtn_gap": rtn_gap}
                                  for name, (ratio, gap, rtn_gap) in ratios.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ComparisonReport":
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


def reference_for(precision: str, precisions: Sequence[str]) -> str | None:
    """Quantized -> bf16 (their compute dtype); bf16 / fp16 -> fp32 when fp32 is measured too."""
    if precision not in UNQUANTIZED:
        return QUANTIZED_COMPUTE
    return "fp32" if precision != "fp32" and "fp32" in precisions else None


def split_calibrated(precision: str) -> tuple[str, bool]:
    """("nf4", True) for "nf4-calibrated"; (precision, False) for anything else."""
    if precision.endswith(CALIBRATED):
        return precision[: -len(CALIBRATED)], True
    return precision, False


def load_precision(path: str | os.PathLike, precision: str) -> nn.Module:
    """The model at `precision`; a calibrated one is calibrated here (its time counts as load time)."""
    from .loading import load

    if precision in UNQUANTIZED:
        return load(path, torch_dtype=UNQUANTIZED[precision], progress=False)
    preset, calibrated = split_calibrated(precision)
    compute = UNQUANTIZED[QUANTIZED_COMPUTE]
    if not calibrated:
        return load(path, quantization=preset, torch_dtype=compute, progress=False)
    from .calibration import CalibrationConfig, calibrate

    model, _ = calibrate(path, None, CalibrationConfig(quantization=preset, dtype=compute), progress=False)
    return model


def stored_precision(path: str | os.PathLike) -> str | None:
    """The preset name of a pre-quantized checkpoint ("nf4", ...); None for a float one."""
    from .config import OPTConfig
    from .quantization import QuantizationConfig

    data = OPTConfig.from_pretrained(path).quantization_config
    return QuantizationConfig.from_dict(data, f"{path}: quantization_config").name if data else None


def model_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's own tokenizer files if it has them, else None: the bundled one (all OPTs share it)."""
    from .tokenizer import OPTTokenizer

    folder = Path(path)
    own = (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()
    return OPTTokenizer.from_pretrained(folder) if own else None


def _environment() -> dict[str, Any]:
    import bitsandbytes

    from . import __version__

    return {"qopt": __version__, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}


def _run_order(precisions: Sequence[str], reference: bool) -> list[str]:
    """Unquantized first so references exist before what they judge; bf16 is added if a quantized one needs it."""
    from .quantization import QuantizationConfig

    names = list(dict.fromkeys(precisions))
    if not names:
        raise ValueError("precisions: expected at least one precision")
    for name in names:
        if name not in UNQUANTIZED:  # an unknown name fails here, before any model is loaded
            QuantizationConfig.from_name(split_calibrated(name)[0])
    if reference and any(p not in UNQUANTIZED for p in names) and QUANTIZED_COMPUTE not in names:
        names.append(QUANTIZED_COMPUTE)
    return sorted(names, key=lambda p: (p not in UNQUANTIZED, p != "fp32"))


def compare_precisions(model_path: str | os.PathLike, precisions: Sequence[str] = DEFAULT_PRECISIONS,
                       seqlen: int | None = None, max_windows: int | None = None, stride: int | None = None,
                       tokenizer: Any = None, reference: bool = True, text: str | None = None,
                       progress: bool = True) -> ComparisonReport:
    """Load `model_path` at each precision and measure it; see the module docstring for what a row holds.

    With `reference`, every quantized precision is judged against bf16 (added if missing) and bf16 / fp16
    against fp32 when fp32 is in the list; a reference model stays loaded only while something still needs it.
    """
    from .config import OPTConfig

    order = _run_order(precisions, reference)
    stored = stored_precision(model_path)
    if stored is not None and order != [stored]:
        raise ValueError(f"{model_path} is already quantized ({stored}): it can be measured only as {stored}, "
                         f"without references (compare precisions on its float checkpoint)")
    limit = OPTConfig.from_pretrained(model_path).max_position_embeddings
    if seqlen is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds {model_path}'s max_position_embeddings ({limit})")
    seqlen = seqlen or limit
    ids = text_ids(text, tokenizer or model_tokenizer(model_path))
    windows = plan_windows(int(ids.numel()), seqlen, stride, max_windows)
    if progress:
        print(describe_windows(int(ids.numel()), seqlen, stride, max_windows), flush=True)
    refs_needed = {p: reference_for(p, order) if reference else None for p in order}
    loaded: dict[str, nn.Module] = {}
    report = ComparisonReport(str(model_path), {"precisions": list(order), "seqlen": seqlen, "stride": stride,
                                                "windows": max_windows, "reference": reference},
                              int(ids.numel()), len(windows), sum(w.scored for w in windows),
                              environment=_environment())
    for i, precision in enumerate(order):
        began = time.perf_counter()
        model = load_precision(model_path, precision)
        load_seconds = time.perf_counter() - began
        ref_name = refs_needed[precision]
        result = evaluate_ids(model, ids, seqlen, stride, max_windows, progress,
                              reference=loaded.get(ref_name) if ref_name else None, desc=precision)
        foot = weight_footprint(model)  # after the evaluation: 4-bit layers are in their repacked state
        row = PrecisionRow(precision, result.ppl, result.nll, result.seconds, load_seconds, foot.bytes,
                           foot.params, foot.bits_per_param, foot.linear_bits_per_param, kl=result.kl,
                           top1=result.top1)
        ref_row = report.row(ref_name) if ref_name else None
        if ref_row is not None:
            row.reference, row.delta = ref_name, result.ppl - ref_row.ppl
            row.delta_rel = row.delta / ref_row.ppl
        report.rows.append(row)
        if progress:
            print(f"{precision:>7s}: {result.summary()}", flush=True)
        if precision in refs_needed.values():
            loaded[precision] = model
        del model
        later = set(refs_needed[p] for p in order[i + 1:])
        for name in [n for n in loaded if n not in later]:
            del loaded[name]
        gc.collect()
    return report


# -- the regression gate -------------------------------------------------------------------------------------
BUNDLED = "bundled"


def model_label(model_path: str | os.PathLike) -> str:
    """How a baseline names its model: "bundled" for the model that ships with qopt, else the path given."""
    from .bundled import bundled_model_dir

    path = Path(model_path)
    return BUNDLED if path.exists() and path.resolve() == bundled_model_dir().resolve() else str(model_path)


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
    from .bundled import bundled_model_dir

    return str(bundled_model_dir()) if baseline.model == BUNDLED else baseline.model


def rerun_baseline(baseline: ComparisonReport, model_path: str | os.PathLike | None = None,
                   progress: bool = True) -> ComparisonReport:
    """The baseline's exact settings (precisions, seqlen, stride, window prefix, references) run again."""
    s = baseline.settings
    return compare_precisions(model_path or baseline_model_path(baseline), s["precisions"], s["seqlen"],
                              s.get("windows"), s.get("stride"), reference=s.get("reference", True),
                              progress=progress)


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
