"""Precision names of the comparison and the gate ("fp32", "nf4", "nf4-calibrated", ...) and which precision
judges which. Torch-free, so the command line can show them without importing torch."""
from __future__ import annotations

from collections.abc import Sequence

UNQUANTIZED_NAMES = ("fp32", "bf16", "fp16")
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8", "nf4", "fp4", "nf4-dq")
CALIBRATED = "-calibrated"  # suffix: the preset before it, rounded with GPTQ on calibration data
# Quantized models compute in bf16 here (this CPU has fast bf16, no fast fp16), so a quantized precision's
# gap is measured against the unquantized model in that same compute dtype: the gap is then quantization alone.
QUANTIZED_COMPUTE = "bf16"


def reference_for(precision: str, precisions: Sequence[str]) -> str | None:
    """Quantized -> bf16 (their compute dtype); bf16 / fp16 -> fp32 when fp32 is measured too."""
    if precision not in UNQUANTIZED_NAMES:
        return QUANTIZED_COMPUTE
    return "fp32" if precision != "fp32" and "fp32" in precisions else None


def split_calibrated(precision: str) -> tuple[str, bool]:
    """("nf4", True) for "nf4-calibrated"; (precision, False) for anything else."""
    if precision.endswith(CALIBRATED):
        return precision[: -len(CALIBRATED)], True
    return precision, False
