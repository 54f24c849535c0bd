"""The perplexity regression gate: a baseline run, what it allows, and the verdict on a re-run.

A baseline (format 2, `write_baseline`) is the JSON report of one `compare_precisions` run
(qopt.evaluation.report) plus:

- `files`: sha256 of the evaluation text and of the tokenizer files. A re-run on other files is not comparable
  (`NotComparable`, exit 2 from the CLI); the same files giving other token or window counts is a regression.
- `digests`: per precision, sha256 of the state dict a save writes after the evaluation's forward passes
  (`state_dict`) and of the settings the quantized modules run with that the state dict does not hold, such as
  LLM.int8's outlier threshold (`modules`). On CPU the 4-bit kernel reads a bf16 copy of the absmax, so
  statistics saved wrongly (double quantization dropped, absmax rounded) cannot show in the logits; the
  digest shows them.
- `tolerance`: per precision (`Limits`): perplexity (relative), KL to the reference (relative, with an absolute
  floor), top-1 agreement (percentage points) and whether the digests must match; optionally the claim that
  each calibrated precision's gap stays at most `max_gap_ratio` x its round-to-nearest preset's gap.
- `noise`: how the tolerances were derived (evals/gate_noise.py): the spread of each measure over repeated
  runs in fresh processes, thread counts, run orders and CPU kernel paths, and the rule max(k x spread, floor).

Every check is two-sided: a 4-bit model that suddenly agrees better with its reference is as suspect as one
that drifts away. A format-1 baseline (perplexity with one relative tolerance) still loads; the verdict then
lists the measures it could not check.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QoptError
from ..model.tokenizer import own_tokenizer
from .compare import compare_precisions
from .report import BUNDLED, ComparisonReport, model_label

BASELINE_FORMAT = 2
DIGESTS = ("state_dict", "modules")


class NotComparable(QoptError):
    """The re-run would read other data (text or tokenizer files) than the baseline did."""


# -- tolerances ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """How far one precision may move from its baseline before the gate fails, in either direction.

    The defaults are the floors evals/gate_noise.py applies (each tolerance is max(k x measured spread, floor));
    None leaves a measure unchecked (a format-1 baseline has a perplexity tolerance only).
    """

    ppl: float | None = 0.002  # relative change of perplexity
    kl: float | None = 0.05  # relative change of KL(reference || model), nats per token
    kl_floor: float = 2e-6  # absolute KL change always allowed (a KL near zero has no useful relative change)
    top1: float | None = 0.15  # top-1 agreement with the reference, percentage points
    digests: tuple[str, ...] = DIGESTS  # the digests that must be identical

    def __post_init__(self) -> None:
        if self.ppl is not None and not 0 < self.ppl < 1:
            raise ValueError(f"perplexity tolerance {self.ppl}: expected a relative tolerance between 0 and 1 "
                             f"(e.g. 0.002)")
        if self.kl is not None and not self.kl > 0:
            raise ValueError(f"KL tolerance {self.kl}: expected a positive relative tolerance (e.g. 0.05)")
        if not self.kl_floor >= 0:
            raise ValueError(f"KL floor {self.kl_floor}: expected an absolute KL >= 0 (nats per token)")
        if self.top1 is not None and not 0 < self.top1 <= 100:
            raise ValueError(f"top-1 tolerance {self.top1}: expected percentage points in (0, 100] (e.g. 0.15)")
        unknown = [d for d in self.digests if d not in DIGESTS]
        if unknown or isinstance(self.digests, str):
            raise ValueError(f"digests {self.digests!r}: expected a list of {', '.join(DIGESTS)}")

    def kl_allowed(self, base: float) -> float:
        """The absolute KL change allowed around a baseline KL of `base`."""
        return max(self.kl * abs(base), self.kl_floor)

    def to_dict(self) -> dict[str, Any]:
        return {"ppl_relative": self.ppl, "kl_relative": self.kl, "kl_floor": self.kl_floor,
                "top1_points": self.top1, "digests": list(self.digests)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Limits | None = None) -> Limits:
        """Fields given in `data` over `base` (a baseline's per-precision entry may name only some)."""
        names = {"ppl_relative": "ppl", "kl_relative": "kl", "kl_floor": "kl_floor", "top1_points": "top1",
                 "digests": "digests"}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown tolerance field {unknown[0]!r} (expected {', '.join(names)})")
        values = {names[k]: (tuple(v) if k == "digests" else None if v is None else float(v)) for k, v in data.items()}
        return replace(base or cls(), **values)

    def describe(self) -> str:
        parts = [] if self.ppl is None else [f"perplexity ±{self.ppl:.2%}"]
        if self.kl is not None:
            parts.append(f"KL ±{self.kl:.1%} (at least {self.kl_floor:.1e} nats)")
        if self.top1 is not None:
            parts.append(f"top-1 ±{self.top1:.2f} points")
        if self.digests:
            parts.append("identical " + " and ".join(d.replace("_", "-") for d in self.digests) + " digests")
        return ", ".join(parts) or "nothing"


LIMIT_OVERRIDES = ("ppl", "kl", "kl_floor", "top1", "digests")


@dataclass(frozen=True)
class Tolerance:
    """A baseline's limits: `default` for every precision without its own entry in `precisions`, plus the
    optional claim that a calibrated precision's gap stays at most `max_gap_ratio` x its round-to-nearest one."""

    default: Limits = field(default_factory=Limits)
    precisions: Mapping[str, Limits] = field(default_factory=dict)
    max_gap_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_gap_ratio is not None and not self.max_gap_ratio > 0:
            raise ValueError(f"max_gap_ratio {self.max_gap_ratio}: expected a positive ratio (e.g. 0.5)")

    def limits(self, precision: str) -> Limits:
        return self.precisions.get(precision, self.default)

    def override(self, **given: Any) -> Tolerance:
        """The same tolerance with the fields in `given` (ppl, kl, kl_floor, top1, digests; None = keep) set for
        every precision, as the command line's --tolerance / --kl-tolerance / ... do."""
        unknown = set(given) - set(LIMIT_OVERRIDES)
        if unknown:
            raise TypeError(f"override: unknown field {sorted(unknown)[0]!r}")
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            return self
        return Tolerance(replace(self.default, **given),
                         {p: replace(lim, **given) for p, lim in self.precisions.items()},
                         self.max_gap_ratio)

    @classmethod
    def coerce(cls, value: Tolerance | Limits | float) -> Tolerance:
        """A Tolerance as given; Limits for every precision; a bare number as the perplexity tolerance."""
        if isinstance(value, cls):
            return value
        return cls(value if isinstance(value, Limits) else Limits(ppl=float(value)))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"default": self.default.to_dict()}
        if self.precisions:
            data["precisions"] = {p: lim.to_dict() for p, lim in self.precisions.items()}
        if self.max_gap_ratio is not None:
            data["max_gap_ratio"] = self.max_gap_ratio
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tolerance:
        default = Limits.from_dict(data.get("default", {}))
        precisions = {p: Limits.from_dict(v, default) for p, v in data.get("precisions", {}).items()}
        ratio = data.get("max_gap_ratio")
        return cls(default, precisions, None if ratio is None else float(ratio))

    def describe(self) -> str:
        own = sorted(p for p, lim in self.precisions.items() if lim != self.default)
        text = self.default.describe() + (f"; own limits for {', '.join(own)}" if own else "")
        if self.max_gap_ratio is not None:
            text += f"; calibrated gap <= {self.max_gap_ratio:g} x round-to-nearest"
        return text


# -- what a run records besides its report ---------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_files(model_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """sha256 of the files the evaluation reads: the WikiText-2 test text and the tokenizer files (the model's
    own when it has them, as `own_tokenizer` decides, else the bundled ones)."""
    from ..bundled import bundled_tokenizer_dir, wikitext2_test_path

    text = wikitext2_test_path()
    folder = Path(model_path)
    if not ((folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()):
        folder = bundled_tokenizer_dir()
    names = ("tokenizer.json",) if (folder / "tokenizer.json").exists() else ("vocab.json", "merges.txt")
    return {"text": {text.name: _sha256_file(text)},
            "tokenizer": {name: _sha256_file(folder / name) for name in names if (folder / name).exists()}}


def _module_settings(module: nn.Module) -> dict[str, Any] | None:
    """What a quantized module computes with beyond its saved tensors; None for other modules."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        return {"kind": "int8", "threshold": float(module.state.threshold),
                "has_fp16_weights": bool(module.state.has_fp16_weights)}
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        return {"kind": "4bit", "quant_type": getattr(weight, "quant_type", None),
                "blocksize": getattr(weight, "blocksize", None),
                "compress_statistics": bool(getattr(weight, "compress_statistics", False)),
                "compute_dtype": str(module.compute_dtype)}
    return None


def state_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of the model's state dict as a save writes it now (names, dtypes, shapes, bytes) and of its
    quantization settings (the config's quantization_config, each quantized module's threshold, format, block
    size and compute dtype). Called after a forward, so the 4-bit layers are in their CPU-repacked state."""
    state = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        state.update(f"{key} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
        state.update(t.reshape(-1).view(torch.uint8).numpy())
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    modules = {name: s for name, m in model.named_modules() if (s := _module_settings(m)) is not None}
    settings = json.dumps({"quantization_config": config, "modules": modules}, sort_keys=True, default=str)
    return {"state_dict": state.hexdigest(), "modules": hashlib.sha256(settings.encode()).hexdigest()}


@dataclass
class Measurement:
    """One run of a gate's settings: the report, each precision's digests, the data files it read.

    `stopped` says why no precision ran (the text gave other token counts than the baseline's)."""

    report: ComparisonReport
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    stopped: str | None = None


def measure(model_path: str | os.PathLike, precisions: Sequence[str], seqlen: int | None = None,
            max_windows: int | None = None, stride: int | None = None, reference: bool = True,
            progress: bool = True, **options: Any) -> Measurement:
    """`compare_precisions` (`options`: placement, adapter) with each model's digests taken after its
    evaluation, and the data files' hashes."""
    digests: dict[str, dict[str, str]] = {}
    report = compare_precisions(model_path, precisions, seqlen, max_windows, stride, reference=reference,
                                progress=progress, on_model=lambda p, m: digests.__setitem__(p, state_digests(m)),
                                **options)
    return Measurement(report, digests, data_files(model_path))


# -- baselines -------------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """A baseline file as read: its report, tolerance and what format 2 adds (None / {} in a format-1 file)."""

    report: ComparisonReport
    tolerance: Tolerance
    format: int = BASELINE_FORMAT
    files: dict[str, dict[str, str]] | None = None
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    noise: dict[str, Any] | None = None
    path: str = ""
    revision: str | None = None  # the commit of a Hub model


def write_baseline(run: Measurement, path: str | os.PathLike, tolerance: Tolerance | Limits | float = Tolerance(),
                   noise: Mapping[str, Any] | None = None) -> None:
    """A run plus what the gate allows (format 2); its settings are what `rerun_baseline` runs again."""
    tolerance = Tolerance.coerce(tolerance)
    if tolerance.max_gap_ratio is not None and not run.report.gap_ratios():
        raise ValueError("max_gap_ratio needs a calibrated precision and its round-to-nearest preset in the run "
                         "(e.g. nf4 and nf4-calibrated)")
    if run.stopped:
        raise ValueError(f"cannot write a baseline from a run that measured nothing ({run.stopped})")
    extra: dict[str, Any] = {"format": BASELINE_FORMAT, "files": run.files, "digests": run.digests,
                             "tolerance": tolerance.to_dict()}
    if noise is not None:
        extra["noise"] = dict(noise)
    model, revision = _portable_model(run.report.model, Path(path))
    if revision is not None:
        extra["revision"] = revision
    replace(run.report, model=model).save_json(path, extra=extra)


def _portable_model(model: str, baseline_file: Path) -> tuple[str, str | None]:
    """How a baseline names its model so `--check` finds it from any folder and any clone: "bundled"; a folder
    relative to the baseline file's folder ("./x", "../x"); a Hub model (by id or by its HF cache snapshot) as
    its repo id and commit."""
    from ..io.hub import cached_folder, model_name

    label = model_label(model)
    if label == BUNDLED:
        return label, None
    folder = Path(model).expanduser()
    if folder.is_dir():
        real = folder.resolve()
        repo = model_name(str(real))
        if repo != str(real):  # …/models--org--name/snapshots/<commit>
            return repo, real.name
        relative = Path(os.path.relpath(real, baseline_file.expanduser().resolve().parent)).as_posix()
        return (relative if relative.startswith("../") else f"./{relative}"), None
    snapshot = cached_folder(model)
    return model, snapshot.name if snapshot is not None else None


def read_baseline(path: str | os.PathLike) -> Baseline:
    """A format-2 baseline, or a format-1 one (perplexity tolerance only; no digests or file hashes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such baseline file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON baseline ({err})") from None
    if not isinstance(data, dict) or data.get("format") not in (1, BASELINE_FORMAT):
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path}: field 'format' is {found!r}, expected 1 or {BASELINE_FORMAT}")
    try:
        report = ComparisonReport.from_dict(data)
        missing = [k for k in ("precisions", "seqlen") if k not in report.settings]
        if missing:
            raise KeyError(f"settings.{missing[0]}")
        limits = data["tolerance"]
        if data["format"] == 1:
            ratio = limits.get("max_gap_ratio")
            untested = Limits(ppl=float(limits["relative"]), kl=None, top1=None, digests=())
            return Baseline(report, Tolerance(untested, {}, None if ratio is None else float(ratio)), 1,
                            path=str(path))
        tolerance = Tolerance.from_dict(limits)
        files = {kind: dict(data["files"][kind]) for kind in ("text", "tokenizer")}
        digests = {p: {k: str(d[k]) for k in DIGESTS} for p, d in data.get("digests", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: malformed baseline (missing or bad field {err})") from None
    revision = data.get("revision")
    return Baseline(report, tolerance, BASELINE_FORMAT, files, digests, data.get("noise"), str(path),
                    revision if isinstance(revision, str) else None)


def baseline_model_path(baseline: Baseline | ComparisonReport) -> str:
    """The model a baseline names: the bundled one, a folder relative to the baseline file ("./x", "../x"), a
    Hub model at its recorded commit (from the HF cache, or downloaded), or, in older baselines, the path or
    id as typed."""
    from ..bundled import bundled_model_dir

    report = baseline.report if isinstance(baseline, Baseline) else baseline
    if report.model == BUNDLED:
        return str(bundled_model_dir())
    if isinstance(baseline, Baseline) and report.model.startswith(("./", "../")) and baseline.path:
        return os.path.normpath(Path(baseline.path).expanduser().resolve().parent / report.model)
    if isinstance(baseline, Baseline) and baseline.revision:
        from ..io.hub import checkpoint_folder

        return str(checkpoint_folder(report.model, revision=baseline.revision))
    return report.model


def select_precisions(baseline: Baseline, precisions: Sequence[str] | None = None) -> list[str]:
    """The baseline's precisions, or the subset asked for, in the baseline's order (compare_precisions adds the
    bf16 reference of a quantized one, as in any run)."""
    names = list(baseline.report.settings["precisions"])
    if precisions is None:
        return names
    unknown = [p for p in precisions if p not in names]
    if unknown:
        raise ValueError(f"--precisions: {', '.join(unknown)} not in the baseline {baseline.path} "
                         f"(it has {' '.join(names)})")
    return [p for p in names if p in precisions]


def check_files(baseline: Baseline, model_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The data files' hashes now; `NotComparable` when they differ from the ones the baseline recorded."""
    files = data_files(model_path)
    if baseline.files is None:
        return files
    changed = [f"{kind} file {name} (sha256 {files[kind].get(name, 'missing')[:12]}, baseline {sha[:12]})"
               for kind in ("text", "tokenizer") for name, sha in baseline.files.get(kind, {}).items()
               if files[kind].get(name) != sha]
    changed += [f"{kind} file {name} (not in the baseline)" for kind in ("text", "tokenizer")
                for name in files[kind] if name not in baseline.files.get(kind, {})]
    if changed:
        raise NotComparable(f"{baseline.path}: not comparable: other data than the baseline's: {'; '.join(changed)}")
    return files


def rerun_baseline(baseline: Baseline, model_path: str | os.PathLike | None = None,
                   precisions: Sequence[str] | None = None, progress: bool = True, **options: Any) -> Measurement:
    """The baseline's settings (seqlen, stride, window prefix, references, compute dtype) run again on its
    precisions or the `precisions` subset. Other data files raise `NotComparable` before anything runs; when the
    text gives other token counts no model runs either (nothing would be comparable) and the measurement says so."""
    from .perplexity import cut_windows, text_ids

    path = model_path or baseline_model_path(baseline)
    s = baseline.report.settings
    files = check_files(baseline, path)
    ids = text_ids(None, own_tokenizer(path))  # cached per process: compare_precisions reuses it
    seqlen = s["seqlen"]
    windows = cut_windows(int(ids.numel()), seqlen, s.get("stride"), s.get("windows"))
    counts = (int(ids.numel()), len(windows), sum(w.scored for w in windows))
    base = baseline.report
    if counts != (base.total_tokens, base.windows, base.tokens):
        report = ComparisonReport(str(path), dict(s), *counts)
        return Measurement(report, {}, files, stopped="the text gives other token counts than the baseline's")
    # the baseline's compute dtype, not this machine's default: baselines from before it was recorded ran in bf16
    run = measure(path, select_precisions(baseline, precisions), seqlen, s.get("windows"), s.get("stride"),
                  reference=s.get("reference", True), progress=progress, compute=s.get("compute", "bf16"),
                  **options)
    run.files = files
    return run
