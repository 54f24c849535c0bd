"""What merging an adapter keeps of its gain, measured on WikiText-2: `qopt.merge_and_unload(measure=True)`,
and `qopt merge` end to end (`merge_adapter`).

The merge itself is `qopt.finetuning.merge`'s: the exact float merge (`merged_float_model`: the dequantized base
the adapter was trained on, plus B @ A), which `merged_model` keeps at 16 bits or re-quantizes to 8 or 4 bits,
by round-to-nearest or by GPTQ calibration of the merged float model. Each is scored against the unmerged
adapter model on the same windows: NLL, KL(adapter model || merged) and the share of the adapter's gain over its
base that the merge lost (`MergeQuality`). A quantized base re-quantizes each merged weight, and the rank-r
update is small next to a 4-bit step, so much of it can round away; the measurement says how much.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calibration.layerwise import CalibrationConfig, calibrate, calibration_windows
from ..finetuning.lora import disable_adapters
from ..finetuning.merge import (
    MergeReport,
    adapter_to_merge,
    load_adapter_model,
    merge_into_base,
    merged_float_model,
    training_quantization,
)
from ..io.outputs import check_output_folder
from ..loading.loader import AUXILIARY_FILES, load
from ..loading.saving import save_model
from ..quant.config import QuantizationConfig
from ..quant.modules import quantize_model
from .perplexity import evaluate_perplexity

METHODS = ("rtn", "calibrated")
LOST_WARNING = 0.5  # warn when a merge loses more than this share of the adapter's gain


@dataclass
class MergeQuality:
    """Mean token NLLs (nats) of the base alone, the base with its adapter, and the merged model, on the same
    text; `kl` is KL(adapter model || merged model) per token where it was measured."""

    base_nll: float
    adapter_nll: float
    merged_nll: float
    kl: float | None = None
    tokens: int = 0

    @property
    def gain(self) -> float:
        """What the adapter improves over its base (positive when it helps on this text)."""
        return self.base_nll - self.adapter_nll

    @property
    def lost_fraction(self) -> float:
        """The share of the adapter's gain the merge gives back: 0 = all kept, 1 = back at the base model."""
        if self.gain <= 0:
            return math.nan  # an adapter that does not help on this text has no gain to lose
        return (self.merged_nll - self.adapter_nll) / self.gain

    def summary(self) -> str:
        kl = f", KL to the adapter model {self.kl:.5f}" if self.kl is not None else ""
        lost = "n/a (the adapter does not lower the NLL on this text)" if math.isnan(self.lost_fraction) else \
            f"{self.lost_fraction:.1%} of the adapter's gain lost"
        return (f"NLL base {self.base_nll:.5f}, adapter {self.adapter_nll:.5f} (gain {self.gain:+.5f}), merged "
                f"{self.merged_nll:.5f} ({self.merged_nll - self.adapter_nll:+.5f}){kl}: {lost}")

    def warning(self) -> str | None:
        """The message to warn with when most of the gain is gone, or None."""
        if math.isnan(self.lost_fraction) or self.lost_fraction <= LOST_WARNING:
            return None
        return (f"merging into the quantized weights lost {self.lost_fraction:.0%} of the adapter's gain "
                f"(NLL {self.adapter_nll:.4f} -> {self.merged_nll:.4f}, base {self.base_nll:.4f}); merge at 16 bits "
                f"instead: qopt merge BASE ADAPTER --bits 16 --output DIR")


@dataclass
class MergeResult:
    output: str
    bits: int
    method: str
    base_quantization: str | None
    quality: MergeQuality
    report: MergeReport  # per-layer error of the float merge (zero for a float base)

    def summary(self) -> str:
        how = "16-bit" if self.bits == 16 else f"{self.bits}-bit {self.method}"
        base = self.base_quantization or "float"
        return f"merged into a {how} model ({base} base) in {self.output}\n{self.quality.summary()}"


def merged_model(base: str | os.PathLike, adapter: str | os.PathLike, *, bits: int = 16, method: str = "rtn",
                 quant_type: str = "nf4", double_quant: bool = False, base_quantization: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, calibration_text: str | None = None,
                 calibration_count: int = 128, progress: bool = True, check_base: bool = True
                 ) -> tuple[nn.Module, MergeReport]:
    """The merged model in memory: the exact float merge, kept at 16 bits or re-quantized (see `merge_adapter`).
    It lives above calibration because the calibrated re-quantization is GPTQ."""
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if method == "calibrated" and bits == 16:
        raise ValueError("method 'calibrated' rounds to 4 or 8 bits; a 16-bit merge has nothing to calibrate")
    merged, report = merged_float_model(base, adapter, base_quantization, check_base=check_base)
    if bits == 16:
        return merged.to(dtype), report
    target = QuantizationConfig.from_bits(bits, quant_type, double_quant)
    if method == "calibrated":
        ids = calibration_windows(calibration_text, count=calibration_count,
                                  seqlen=min(merged.config.max_position_embeddings, 2048))
        merged, _ = calibrate(merged, ids, CalibrationConfig(quantization=target, dtype=dtype), progress=progress)
        return merged, report
    return quantize_model(merged.to(dtype), target), report


def adapter_nlls(unmerged: nn.Module, windows: int = 40, text: str | None = None,
                 progress: bool = True) -> tuple[float, float]:
    """(base NLL, adapter NLL) of a model carrying its active adapter, on WikiText-2 (or `text`)."""
    with disable_adapters(unmerged):
        base = evaluate_perplexity(unmerged, text=text, max_windows=windows, progress=progress).nll
    return base, evaluate_perplexity(unmerged, text=text, max_windows=windows, progress=progress).nll


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike, *,
                  bits: int = 16, method: str = "rtn", quant_type: str = "nf4", double_quant: bool = False,
                  base_quantization: str | None = "auto", dtype: torch.dtype = torch.bfloat16, windows: int = 40,
                  text: str | None = None, calibration_text: str | None = None, calibration_count: int = 128,
                  overwrite: bool = False, progress: bool = True, check_base: bool = True) -> MergeResult:
    """Merge `adapter` into `base`, write the merged checkpoint to `output` and measure what it kept.

    `base_quantization` is how the adapter's base was loaded for training ("auto": read from the adapter's
    qopt checkpoint, float when there is none); `bits` 16 writes `dtype` weights, 8 / 4 re-quantize, by
    round-to-nearest (`method="rtn"`) or GPTQ calibration of the merged float model (`"calibrated"`). The
    measurement uses `windows` windows of WikiText-2 test, or of `text`. `check_base` as in `load_adapter`.
    """
    if method == "calibrated" and bits == 16:
        raise ValueError("method 'calibrated' rounds to 4 or 8 bits; a 16-bit merge has nothing to calibrate")
    check_output_folder(output, [base, adapter], overwrite=overwrite)
    if base_quantization == "auto":
        base_quantization = training_quantization(adapter)
    unmerged = load_adapter_model(base, adapter, base_quantization, progress, check_base)
    base_nll, adapter_nll = adapter_nlls(unmerged, windows, text, progress)
    merged, report = merged_model(base, adapter, bits=bits, method=method, quant_type=quant_type,
                                  double_quant=double_quant, base_quantization=base_quantization, dtype=dtype,
                                  calibration_text=calibration_text, calibration_count=calibration_count,
                                  progress=progress, check_base=check_base)
    extras = [Path(base) / name for name in AUXILIARY_FILES if (Path(base) / name).is_file()]
    save_model(merged, output, extra_files=extras)
    del merged
    written = load(output, progress=False)
    scored = evaluate_perplexity(written, text=text, max_windows=windows, progress=progress, reference=unmerged)
    quality = MergeQuality(base_nll, adapter_nll, scored.nll, scored.kl, scored.tokens)
    return MergeResult(str(output), bits, method, base_quantization, quality, report)


def merge_and_unload(model: nn.Module, adapter_name: str | None = None, *, measure: bool = False,
                     windows: int = 40, text: str | None = None, progress: bool = False) -> MergeReport:
    """`qopt.finetuning.merge.merge_into_base`, and with `measure=True` the NLL of the base, the adapter model
    and the merged model on `windows` WikiText-2 windows (or `text`) in `report.quality`; a merge into
    quantized weights that loses most of the adapter's gain warns and points to the 16-bit merge."""
    if not measure:
        return merge_into_base(model, adapter_name)
    name = adapter_to_merge(model, adapter_name)
    base, with_adapter = adapter_nlls(model, windows, text, progress)
    report = merge_into_base(model, name)
    merged = evaluate_perplexity(model, text=text, max_windows=windows, progress=progress)
    report.quality = MergeQuality(base, with_adapter, merged.nll, tokens=merged.tokens)
    message = report.quality.warning()
    if message:
        warnings.warn(message, stacklevel=2)
    return report
