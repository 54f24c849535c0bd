"""What loading a Hub model will download, and the disk and host memory the load takes, from metadata alone:
the Hub's file list, config.json, the index and (safetensors) every shard header read by HTTP range.

The numbers follow the streamed load (`qopt/io/download.py`): shards arrive one after another; with the default
`keep_download=True` every shard stays in the HF cache, with `keep_download=False` at most two are on disk at a
time (the one being read and the next one arriving). Host memory has two parts: anonymous memory, which must
fit (the weights the plan keeps in RAM plus the quantizer's float32 chunks: tensors are quantized a chunk at a
time, never copied whole),
and the shard being read, memory-mapped: file pages the kernel can drop under pressure, so a shard larger
than the free RAM slows the load down but does not make it fail.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..io.checkpoint import check_tensor_shapes, normalize_key
from ..io.hub import ModelSource
from ..model.config import OPTConfig
from ..quant.quantizers import CHUNK
from ..utils import dtype_name, format_bytes
from .plan import MemoryPlan
from .sizes import meta_model


@dataclass
class DownloadPlan:
    label: str
    format: str  # "safetensors" or "bin"
    shard_bytes: dict[str, int]  # every shard in load order
    cached: set[str]
    keep_download: bool
    cache_dir: Path | None
    host_weight_bytes: int  # weights the memory plan keeps in CPU RAM (computed there or streamed to a GPU)
    dtype_bytes: dict[str, int] = field(default_factory=dict)  # from the shard headers (safetensors only)
    parameters: int = 0

    @property
    def download_bytes(self) -> int:
        return sum(n for name, n in self.shard_bytes.items() if name not in self.cached)

    @property
    def peak_disk_bytes(self) -> int:
        """Extra disk the load takes: every new shard when kept, else the largest pair of neighbours."""
        fresh = [0 if name in self.cached else n for name, n in self.shard_bytes.items()]
        if self.keep_download:
            return sum(fresh)
        return max((a + b for a, b in zip(fresh, fresh[1:] + [0])), default=0)

    @property
    def quantize_buffer_bytes(self) -> int:
        """The quantizer's float32 temporaries: a chunk, its scaled copy and its codes, per thread."""
        return 3 * 4 * CHUNK * os.cpu_count() if self.host_weight_bytes else 0

    @property
    def peak_anonymous_bytes(self) -> int:
        """What must fit in RAM during the load."""
        return self.host_weight_bytes + self.quantize_buffer_bytes

    @property
    def mapped_bytes(self) -> int:
        """The memory-mapped shard being read: file pages, reclaimable."""
        return max(self.shard_bytes.values(), default=0)

    @property
    def peak_host_bytes(self) -> int:
        return self.peak_anonymous_bytes + self.mapped_bytes

    def format_text(self) -> str:
        count = len(self.shard_bytes)
        cached = f"{len(self.cached)} already cached" if self.cached else "none cached yet"
        lines = [f"download: {format_bytes(self.download_bytes)} from {self.label}, {count} {self.format} "
                 f"shard{'s' if count != 1 else ''} ({cached})"]
        if self.format == "safetensors":
            dtypes = ", ".join(f"{name} {format_bytes(n)}" for name, n in self.dtype_bytes.items())
            how = "by HTTP range" if len(self.cached) < len(self.shard_bytes) else "in the HF cache"
            lines.append(f"checkpoint: {self.parameters / 1e9:.2f}B parameters ({dtypes}), shapes checked against "
                         f"config.json; read from the shard headers {how}")
        else:
            lines.append("checkpoint: .bin shards (pickles have no header to read by range): shapes from "
                         "config.json, sizes from the index and the Hub's file list")
        where = f"the shards stay in the HF cache at {self.cache_dir}" if self.keep_download else \
            "--no-keep-download: at most two shards at a time in a scratch folder, each deleted once read"
        lines.append(f"peak disk during the load: {format_bytes(self.peak_disk_bytes)} ({where})")
        lines.append(f"peak host RAM during the load: {format_bytes(self.peak_anonymous_bytes)} anonymous, must fit "
                     f"(weights kept in RAM {format_bytes(self.host_weight_bytes)} + the quantizer's chunks "
                     f"{format_bytes(self.quantize_buffer_bytes)}), plus up to "
                     f"{format_bytes(self.mapped_bytes)} of the shard being read, memory-mapped (file pages the "
                     f"kernel reclaims under pressure)")
        return "\n".join(lines)


def download_plan(source: ModelSource, memory: MemoryPlan, keep_download: bool = True) -> DownloadPlan:
    """The download side of a plan; headers of shards not in the cache are read by HTTP range and checked
    against config.json, so a repo whose weights do not match its config fails here, before any download."""
    files = source.checkpoint()
    fmt, names = source.shard_names()
    cached = {n for n in names if (source.folder / n).is_file()}
    sizes = {n: (source.folder / n).stat().st_size if n in cached else source.files[n].size or 0 for n in names}
    in_ram = memory.weight_bytes.get("cpu", 0) + memory.weight_bytes.get("host", 0)
    result = DownloadPlan(source.label, fmt, sizes, cached, keep_download,
                          source.settings.cache_dir if source.settings else None, in_ram)
    if files.tensors:
        config = OPTConfig.from_pretrained(source.folder)
        expected = {n: p.shape for n, p in meta_model(config, None).named_parameters()}
        check_tensor_shapes(files, expected, lambda raw: normalize_key(raw, True))
        by_dtype: Counter[str] = Counter()
        for info in files.tensors.values():
            by_dtype[dtype_name(info.dtype)] += info.nbytes
            result.parameters += math.prod(info.shape)
        result.dtype_bytes = dict(by_dtype.most_common())
    return result
