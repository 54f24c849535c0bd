"""Precision names of the comparison and the gate ("fp32", "nf4", "nf4-calibrated", ...) and which precision
judges which. Torch-free, so the command line can show them without importing torch."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

UNQUANTIZED_NAMES = ("fp32", "bf16", "fp16")
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8", "nf4", "fp4", "nf4-dq")
CALIBRATED = "-calibrated"  # suffix: the preset before it, rounded with GPTQ on calibration data
# The compute dtype of quantized models when nothing pins it: decided at run time by `quantized_compute`.
QUANTIZED_COMPUTE_DEFAULT = "bf16"
_FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def quantized_compute(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The dtype quantized models compute in on this machine: bf16 where matmuls in it are fast (a CUDA GPU, or
    a CPU with AVX512-BF16 / AMX), else fp32, since a CPU without them emulates bf16 matmuls slowly. A quantized
    precision's gap is measured against the unquantized model in that same dtype, so the gap is quantization
    alone. QOPT_QUANTIZED_COMPUTE=bf16|fp32 overrides it."""
    forced = os.environ.get("QOPT_QUANTIZED_COMPUTE")
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"QOPT_QUANTIZED_COMPUTE={forced!r}: expected bf16 or fp32")
        return forced
    return "bf16" if _fast_bf16(str(cpuinfo)) else "fp32"


def _fast_bf16(cpuinfo: str) -> bool:
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        flags = []
    if any(flag in flags for flag in _FAST_BF16_FLAGS):
        return True
    import torch  # only here: the module stays importable without torch

    return bool(torch.cuda.is_available())


def reference_for(precision: str, precisions: Sequence[str], compute: str = QUANTIZED_COMPUTE_DEFAULT) -> str | None:
    """Quantized -> `compute` (their compute dtype); bf16 / fp16 -> fp32 when fp32 is measured too."""
    if precision not in UNQUANTIZED_NAMES:
        return compute
    return "fp32" if precision != "fp32" and "fp32" in precisions else None


def split_calibrated(precision: str) -> tuple[str, bool]:
    """("nf4", True) for "nf4-calibrated"; (precision, False) for anything else."""
    if precision.endswith(CALIBRATED):
        return precision[: -len(CALIBRATED)], True
    return precision, False
