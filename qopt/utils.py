"""Small facts every stage shares: dtype names, byte sizes in and out. One home each, so messages and files agree."""
from __future__ import annotations

import ctypes
import sys

import torch

# Names accepted wherever a dtype is given as text: config.json's torch_dtype, quantization_config fields,
# command-line flags and precision names.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "uint8": torch.uint8,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32}
FLOAT_DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype.is_floating_point}

_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BINARY = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling config.json uses."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: str | int | float) -> int:
    """'2GB', '500MiB', '1TiB', '1000', 1e9 -> bytes.

    Our own parser rather than accelerate's `convert_file_size_to_int`: that one reads a lowercase "gb" as
    gigabits and knows no TB; here units are case-insensitive bytes (KB/MB/GB/TB decimal, KiB..TiB binary).
    """
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"size {size!r}: expected a non-negative number of bytes")
        return int(size)
    text = str(size).strip().upper().replace(" ", "")
    number, factor = text, 1
    for unit, value in {**_BINARY, **_DECIMAL, "B": 1}.items():
        if text.endswith(unit):
            number, factor = text[: -len(unit)], value
            break
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {size!r}: expected bytes (e.g. 1000000) or a number with a unit such as "
                         "500MB, 24GiB or 1TiB") from None
    if value < 0 or value != value:
        raise ValueError(f"size {size!r}: expected a non-negative size")
    return int(value * factor)


def format_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB": sizes in messages and reports, in the unit that keeps them readable."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}" if unit != "GiB" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


TRIM_EVERY_BYTES = 256 << 20  # freed temporaries glibc may keep before they go back to the OS


def release_freed_heap(freed: int) -> None:
    """Count `freed` bytes of temporaries just released and hand glibc's free heap back to the OS
    (`malloc_trim`) once TRIM_EVERY_BYTES have gathered. Matrix-sized temporaries below glibc's mmap threshold
    come from its heap and stay resident after they are freed, so the CPU repack of every 4-bit layer at a
    model's first forward would leave many times the layout's own bytes resident, which no plan counts
    (docs/benchmarks.md, "Figures behind library defaults"). Trimming after every matrix would cost page faults
    on each next one, hence the threshold: what stays resident is at most that much plus one matrix's
    temporaries. A no-op where the C library has no `malloc_trim`."""
    _FREED[0] += freed
    if _FREED[0] >= TRIM_EVERY_BYTES:
        trim_heap()


def trim_heap() -> None:
    """`malloc_trim(0)` now: glibc's free heap back to the OS (a no-op elsewhere)."""
    _FREED[0] = 0
    if _TRIM is not None:
        _TRIM(0)


def _malloc_trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
_FREED = [0]
