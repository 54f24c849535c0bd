"""How fast the disk under an offload folder reads, for `qopt plan`'s time estimates.

A file is written, synced and dropped from the page cache (`POSIX_FADV_DONTNEED`), then read back with the
same positional reads the offload store uses; the rate is what an offloaded layer's first read would see.
"""
from __future__ import annotations

import os
import tempfile
import time

from ..utils import parse_size
from .offload_io import read_exact

DEFAULT_PROBE = "64MiB"


def measure_read_bandwidth(folder: str | os.PathLike | None = None, size: int | str = DEFAULT_PROBE) -> float:
    """Bytes per second read from the disk holding `folder` (default: the temp folder), page cache bypassed."""
    nbytes = parse_size(size)
    chunk = os.urandom(min(nbytes, 1 << 20))  # incompressible, in case the file system compresses
    fd, path = tempfile.mkstemp(prefix=".qopt-read-probe-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            for _ in range(-(-nbytes // len(chunk))):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        total = os.path.getsize(path)
        buffer = bytearray(total)
        began = time.perf_counter()
        read_exact(path, memoryview(buffer), evict=True)
        return total / max(time.perf_counter() - began, 1e-9)
    finally:
        os.unlink(path)


def parse_rate(text: str) -> float:
    """"2GB/s", "500MiB/s" or "2GB" -> bytes per second (ValueError naming the text otherwise)."""
    value = str(text).strip()
    for suffix in ("/s", "ps"):
        if value.lower().endswith(suffix):
            value = value[: -len(suffix)]
            break
    try:
        rate = parse_size(value)
    except ValueError:
        rate = 0
    if rate <= 0:
        raise ValueError(f"read bandwidth {text!r}: expected a positive rate such as 2GB/s or 500MiB/s")
    return float(rate)
