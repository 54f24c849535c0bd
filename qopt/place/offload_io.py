"""Reading the offload folder: counted positional reads into reusable buffers, and a prefetcher.

accelerate reads offloaded tensors through NumPy memory maps: every touch of a page is a fault taken while the
reading thread holds whatever it holds, reads cannot run ahead of use, and nothing says how many bytes came
off the disk. Here each `.dat` file is read with `os.preadv` (which releases the GIL) into a preallocated
buffer, every read is counted per tensor, and `Prefetcher` reads the next decoder layers in a background thread
while the current one computes, with at most `depth` layers in flight.

4-bit layers that run on a CPU are also kept, after their first forward, in the layout bitsandbytes' CPU
kernel reads (the repacked weight and a bf16 absmax, written once beside the standard files): later rebuilds
read those instead and skip the repack, which otherwise runs at every forward of an offloaded layer.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..quant.modules import CPU_PACKED_KEYS, cpu_layout_needs, owning_module
from ..utils import DTYPES, dtype_name

logger = logging.getLogger(__name__)
PACKED_SUFFIX = ".cpu-packed"  # offload-folder key of a tensor in the CPU kernel's layout: f"{module}.{key}{suffix}"
_ALIGN = 64  # tensors inside a shared buffer start at multiples of this, so any dtype view is aligned
READ_THREADS = 4  # files of one layer read at once: a disk serves several requests faster than one (figures
# in docs/benchmarks.md)
_PARALLEL_BYTES = 1 << 20  # below this a layer's files are read one after the other


def torch_dtype(name: str) -> torch.dtype:
    """The dtype an offload index entry names ("float32", "bfloat16", "float8_e4m3fn", "int64", ...)."""
    dtype = DTYPES.get(name) or getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"offload index: unknown dtype {name!r}")
    return dtype


def _nbytes(info: Mapping[str, Any]) -> int:
    count = 1
    for size in info["shape"]:
        count *= int(size)
    return count * torch.empty(0, dtype=torch_dtype(info["dtype"])).element_size()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def read_exact(path: str, out: memoryview, evict: bool = False) -> None:
    """Fill `out` from the start of `path` with positional reads (the GIL is released while the kernel copies);
    `evict` drops the file from the page cache afterwards, so the next read comes from the disk again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done, size = 0, len(out)
        while done < size:
            n = os.preadv(fd, [out[done:]], done)
            if n == 0:
                raise CheckpointError(f"{path}: offloaded tensor file is truncated ({done} of {size} bytes)")
            done += n
        if evict:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class OffloadStore(Mapping[str, torch.Tensor]):
    """The tensors of an offload folder (accelerate's `.dat` + `index.json` layout) as a mapping, read on demand.

    `bytes_read` and `reads` (per tensor) count what came from the files; `evict` drops each file from the page
    cache after it is read (benchmarks of a disk, not of RAM). Iteration covers the standard tensors only: the
    CPU-layout copies are a cache for rebuilding, never part of a save.
    """

    def __init__(self, folder: str | os.PathLike, index: Mapping[str, Mapping[str, Any]]) -> None:
        self.save_folder = str(folder)
        self.index = {key: dict(info) for key, info in index.items()}
        self.packed: dict[str, dict[str, Any]] = {}  # PACKED_SUFFIX keys -> index entries
        self.packed_modules: set[str] = set()
        self.bytes_read = 0
        self.reads: Counter[str] = Counter()
        self.evict = False
        self.keep_cpu_layout = True  # off after a failed write (a full disk): rebuilds then repack as before
        self.read_threads = READ_THREADS
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- Mapping ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: object) -> bool:
        return key in self.index or key in self.packed

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._info(key)
        return self._read(key, info, torch.empty(_nbytes(info), dtype=torch.uint8))

    # -- reading ---------------------------------------------------------------------------------------------
    def _info(self, key: str) -> dict[str, Any]:
        info = self.index.get(key) or self.packed.get(key)  # dict lookups are atomic; only iteration needs the lock
        if info is None:
            raise KeyError(key)
        return info

    def nbytes(self, key: str) -> int:
        return _nbytes(self._info(key))

    def _read(self, key: str, info: Mapping[str, Any], buffer: torch.Tensor) -> torch.Tensor:
        size = _nbytes(info)
        if size:
            read_exact(os.path.join(self.save_folder, f"{key}.dat"), memoryview(buffer.numpy())[:size], self.evict)
        with self._lock:
            self.bytes_read += size
            self.reads[key] += 1
        return buffer[:size].view(torch_dtype(info["dtype"])).reshape(info["shape"])

    def layer_keys(self, prefix: str) -> list[str]:
        """The keys a rebuild of the module at `prefix` (ending in ".") reads now: its standard tensors, except
        that 4-bit modules already kept in the CPU layout read that instead of their weight and statistics."""
        with self._lock:  # a prefetch thread asks while the main thread may be adding a module's CPU layout
            packed, modules = list(self.packed), set(self.packed_modules)
        keys = []
        for key in self.index:
            if key.startswith(prefix):
                owner = owning_module(key, modules)
                if owner is None or cpu_layout_needs(key[len(owner) + 1:]):
                    keys.append(key)
        return keys + [key for key in packed if key.startswith(prefix)]

    def buffer_bytes(self, keys: list[str]) -> int:
        """Size of a buffer that holds `keys` side by side (each aligned)."""
        return sum(_aligned(self.nbytes(key)) for key in keys)

    def read_keys(self, keys: list[str], buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Read `keys` into one buffer (a fresh one when None or too small): the tensors are views of it."""
        infos = [self._info(key) for key in keys]
        sizes = [_aligned(_nbytes(info)) for info in infos]
        if buffer is None or buffer.numel() < sum(sizes):
            buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        jobs = [(key, info, buffer[offset:offset + size])
                for key, info, offset, size in zip(keys, infos, offsets, sizes, strict=True)]
        if self.read_threads > 1 and len(jobs) > 1 and sum(sizes) >= _PARALLEL_BYTES:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="qopt-read")
            largest_first = sorted(jobs, key=lambda job: -job[2].numel())
            done = dict(zip([job[0] for job in largest_first], self._pool.map(lambda job: self._read(*job),
                                                                            largest_first), strict=True))
            return {key: done[key] for key in keys}
        return {key: self._read(key, info, part) for key, info, part in jobs}

    # -- the CPU layout cache --------------------------------------------------------------------------------
    def put_packed(self, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep a 4-bit module's CPU-layout tensors (`CPU_PACKED_KEYS`) beside its standard ones. A write that
        fails for lack of space turns the cache off instead of failing the forward."""
        if not self.keep_cpu_layout or module in self.packed_modules:
            return
        entries = {}
        try:
            for key in CPU_PACKED_KEYS:
                tensor = tensors[key].detach().contiguous()
                name = f"{module}.{key}{PACKED_SUFFIX}"
                with open(os.path.join(self.save_folder, f"{name}.dat"), "wb") as file:
                    file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                    if self.evict:  # written pages are dirty until written back, and cannot be dropped before
                        file.flush()
                        os.fsync(file.fileno())
                        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                entries[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            logger.warning("offload folder %s is full: 4-bit layers are repacked at every rebuild instead of "
                           "kept in the CPU kernel's layout (%s)", self.save_folder, err.strerror)
            self.keep_cpu_layout = False
            for name in entries:
                Path(self.save_folder, f"{name}.dat").unlink(missing_ok=True)
            return
        with self._lock:
            self.packed.update(entries)
            self.packed_modules.add(module)


def packed_key(module: str, key: str) -> str:
    """The offload-folder key of one of a module's CPU-layout tensors."""
    return f"{module}.{key}{PACKED_SUFFIX}"


class Prefetcher:
    """Reads the offloaded modules one pass will rebuild, in order, ahead of use.

    A single background thread fills a ring of `depth + 1` reusable buffers, so at most `depth` modules are read
    ahead while one computes; `get(prefix)` returns that module's tensors (waiting for them if needed) and
    `done(prefix)` hands its buffer back. With `depth=0` every read happens in `get`, into one reused buffer.
    """

    def __init__(self, store: OffloadStore, prefixes: list[str], depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth {depth}: expected an integer >= 0")
        self.store, self.order, self.depth = store, list(prefixes), depth
        self.buffers: list[torch.Tensor | None] = [None] * (depth + 1)
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(depth + 1):
            self.free.put(slot)
        self.pending: deque[tuple[str, Future]] = deque()
        self.slots: dict[str, int] = {}
        self.next = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qopt-prefetch") if depth else None
        for _ in range(depth):
            self._submit()

    def _read(self, prefix: str) -> tuple[int, dict[str, torch.Tensor]]:
        slot = self.free.get()
        try:
            keys = self.store.layer_keys(prefix)
            need = self.store.buffer_bytes(keys)
            if self.buffers[slot] is None or self.buffers[slot].numel() < need:
                self.buffers[slot] = torch.empty(need, dtype=torch.uint8)
            return slot, self.store.read_keys(keys, self.buffers[slot])
        except BaseException:
            self.free.put(slot)
            raise

    def _submit(self) -> None:
        if self.next < len(self.order):
            prefix = self.order[self.next]
            self.pending.append((prefix, self.pool.submit(self._read, prefix)))
            self.next += 1

    def get(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.pool is None:
            slot, tensors = self._read(prefix)
        else:
            queued, future = self.pending.popleft()
            if queued != prefix:
                raise RuntimeError(f"prefetch order: asked for {prefix!r}, next read is {queued!r}")
            slot, tensors = future.result()
            self._submit()
        self.slots[prefix] = slot
        return tensors

    def done(self, prefix: str) -> None:
        self.free.put(self.slots.pop(prefix))

    def close(self) -> None:
        for slot in self.slots.values():  # a consumer that stopped early: its buffers cannot block a read
            self.free.put(slot)
        self.slots.clear()
        if self.pool is not None:
            for _, future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
