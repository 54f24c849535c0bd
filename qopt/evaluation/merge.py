"""`qopt merge` and `qopt.merge_and_unload(measure=True)`: an adapter folded into its base, and what the merge
keeps of the adapter's gain, measured on WikiText-2.

The merged model is built exactly in float (`merge_into_float`: the dequantized base the adapter was trained
on, plus B @ A), then saved at 16 bits or re-quantized to 8 or 4 bits, by round-to-nearest or by GPTQ
calibration of the merged float model. Each is scored against the unmerged adapter model on the same windows:
NLL, KL(adapter model || merged) and the share of the adapter's gain over its base that the merge lost.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calibration.layerwise import CalibrationConfig, calibrate, calibration_windows
from ..errors import AdapterError
from ..finetuning import lora as _lora
from ..finetuning.adapters import load_adapter
from ..finetuning.lora import MergeReport, adapter_set, disable_adapters
from ..finetuning.merge import MergeQuality, merge_into_float
from ..finetuning.resume import CHECKPOINT_DIR, TRAINER_STATE
from ..io.outputs import check_output_folder
from ..loading.loader import AUXILIARY_FILES, load
from ..loading.saving import save_model
from ..quant.config import QuantizationConfig
from ..quant.modules import quantize_model
from .perplexity import evaluate_perplexity

METHODS = ("rtn", "calibrated")


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


def training_quantization(adapter: str | os.PathLike) -> str | None:
    """The quantization preset an adapter was trained on, from its qopt training checkpoint; None when it was
    trained on a float base or the folder has no qopt checkpoint (a PEFT adapter)."""
    file = Path(adapter) / CHECKPOINT_DIR / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text())["fingerprint"]["training"].get("quantization")
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _adapter_model(base: str | os.PathLike, adapter: str | os.PathLike, quantization: str | None,
                   progress: bool, check_base: bool = True) -> nn.Module:
    """The base as the adapter was trained on it (float32 outside the quantized linears) with the adapter."""
    model = load(base, quantization=quantization, torch_dtype=None, progress=progress)
    load_adapter(model, adapter, check_base=check_base)
    return model


def merged_model(base: str | os.PathLike, adapter: str | os.PathLike, *, bits: int = 16, method: str = "rtn",
                 quant_type: str = "nf4", double_quant: bool = False, base_quantization: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, calibration_text: str | None = None,
                 calibration_count: int = 128, progress: bool = True, check_base: bool = True
                 ) -> tuple[nn.Module, MergeReport]:
    """The merged model in memory: the exact float merge, kept at 16 bits or re-quantized (see `merge_adapter`)."""
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if method == "calibrated" and bits == 16:
        raise ValueError("method 'calibrated' rounds to 4 or 8 bits; a 16-bit merge has nothing to calibrate")
    merged = _adapter_model(base, adapter, base_quantization, progress=False, check_base=check_base)
    report = merge_into_float(merged)
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
    unmerged = _adapter_model(base, adapter, base_quantization, progress, check_base)
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
    """`qopt.finetuning.lora.merge_and_unload`, and with `measure=True` the NLL of the base, the adapter model
    and the merged model on `windows` WikiText-2 windows (or `text`) in `report.quality`; a merge into
    quantized weights that loses most of the adapter's gain warns and points to the 16-bit merge."""
    if not measure:
        return _lora.merge_and_unload(model, adapter_name)
    adapters = adapter_set(model)
    name = adapter_name or adapters.active
    if name not in adapters.configs:
        raise AdapterError(f"no adapter named {name!r} to merge (have {sorted(adapters.configs)})")
    _lora.set_adapter(model, name)
    base, with_adapter = adapter_nlls(model, windows, text, progress)
    report = _lora.merge_and_unload(model, name)
    merged = evaluate_perplexity(model, text=text, max_windows=windows, progress=progress)
    report.quality = MergeQuality(base, with_adapter, merged.nll, tokens=merged.tokens)
    message = report.quality.warning()
    if message:
        warnings.warn(message, stacklevel=2)
    return report
