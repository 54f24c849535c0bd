"""Every private bitsandbytes / torch internal qopt touches, behind one version check.

qopt reaches past the public APIs in a few places, each for speed with the same bytes and numbers: the 4-bit
rounding bounds (fast quantizers), the CPU kernel's weight layout and its inverse (exact saves after a repack,
qopt's own packer at the first forward), the CPU kernel's C function (lean decode), oneDNN's packed linear
(output head) and `torch._int_mm` (LLM.int8 decode). None of these is a stable API: a minor release may rename
or change them, and a wrong C prototype corrupts memory instead of raising. So they are used only on the
versions the tests ran on (`TESTED_BITSANDBYTES`, `TESTED_TORCH`); elsewhere `SUPPORTED` is False, one line is
logged at import, and qopt takes the public path: bitsandbytes' own quantizer and forward, with the CPU repack
disabled so the weights stay in the standard layout and saved files are byte-identical.
"""
from __future__ import annotations

import copy
import ctypes as ct
import logging
import re
from collections.abc import Callable
from functools import cache

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnbf

logger = logging.getLogger(__name__)

TESTED_BITSANDBYTES = ((0, 48), (0, 50))  # (major, minor) range, both ends included
TESTED_TORCH = ((2, 11), (2, 13))  # 2.11 is the GPU machine's 2.11+cu130


def minor_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "2.11.0+cu130" or "0.50.2.dev0"; None if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def untested(bitsandbytes_version: str, torch_version: str) -> str | None:
    """Why these versions are outside the tested range, or None when both are inside it."""
    for name, version, (low, high) in (("bitsandbytes", bitsandbytes_version, TESTED_BITSANDBYTES),
                                       ("torch", torch_version, TESTED_TORCH)):
        minor = minor_version(version)
        if minor is None or not low <= minor <= high:
            return (f"{name} {version} is outside the range qopt was tested on "
                    f"({low[0]}.{low[1]} to {high[0]}.{high[1]}.x)")
    return None


_REASON = untested(bnb.__version__, torch.__version__)
SUPPORTED = _REASON is None  # tests monkeypatch this to exercise the public path
if _REASON:
    logger.warning("%s: using bitsandbytes' public quantizer and forward (no CPU repack, no lean decode kernels)",
                   _REASON)


# -- bitsandbytes: 4-bit rounding ------------------------------------------------------------------------------
def quantize_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoint bounds between the sorted code values, stored index of each sorted value), as bitsandbytes'
    CPU quantizer rounds with them. On untested versions: the same formula on the public code book."""
    if SUPPORTED:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

        return _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


# -- bitsandbytes: the CPU kernel's weight layout -------------------------------------------------------------
def is_cpu_packed(state: bnbf.QuantState | None) -> bool:
    """Whether a quant state describes the CPU kernel's layout (weight repacked, bf16 absmax)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def packing_temporary_bytes(state: bnbf.QuantState) -> int:
    """Bytes `pack_for_cpu` (or undoing it) allocates and frees for one weight: the standard weight it replaces,
    the two nibble-regrouped halves and their temporaries (half a byte a weight each), and the interleaved copy
    before the reorder (half a byte)."""
    n, k = state.shape
    return 2 * n * k


def pack_for_cpu(weight: torch.Tensor, state: bnbf.QuantState, block_n: int = 32) -> torch.Tensor:
    """What bitsandbytes' repack (`_convert_weight_packed_for_cpu`, run by `Linear4bit.forward` at the first eval
    forward on an AVX512-BF16 CPU) returns, byte for byte, and the same edits to `state` in place. For each group
    of `block_n` rows and pair of columns, byte m holds the code of row m // 2 (low nibble) and of row
    block_n // 2 + m // 2 (high nibble), column m % 2 of the pair. A standard byte already holds a row's pair of
    columns (first code in the high nibble), so the nibbles are regrouped byte-wise and the 2-byte results moved
    as int16 units: no unpacked copy of the codes and no int32 copy of the matrix as in bitsandbytes' route
    (tested equal; timings in docs/benchmarks.md, "Figures behind library defaults")."""
    n, k = state.shape
    if weight.dtype != torch.uint8:
        state.original_storage_type = weight.dtype
        weight = weight.view(torch.uint8)
    state.original_dtype, state.original_nested, state.original_qshape = state.dtype, state.nested, weight.shape
    rows = weight.reshape(n // block_n, 2, block_n // 2, k // 2)
    top, bottom = rows[:, 0], rows[:, 1]  # rows i and block_n // 2 + i of each group
    first = (top >> 4).bitwise_or_(bottom & 0xF0)  # column 2c of the pair: top row low nibble, bottom row high
    second = (top & 0x0F).bitwise_or_(bottom << 4)  # column 2c + 1
    pairs = torch.stack((first, second), dim=-1).view(torch.int16)  # bytes 2i, 2i + 1 of a group's pair c
    packed = pairs.transpose(1, 2).contiguous().view(torch.uint8).view(n, k // 2)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
        state.nested = False
        del state.state2
    state.absmax = absmax.reshape(n, k // state.blocksize).T.to(torch.bfloat16).contiguous()
    state.dtype, state.packing_format_for_cpu = torch.bfloat16, True
    return packed


def pack_for_cpu_by_bitsandbytes(weight: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """bitsandbytes' own repack, for tests to hold `pack_for_cpu` to."""
    packed, _ = bnbf._convert_weight_packed_for_cpu(weight, state)
    return packed


def unpack_weight(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The standard-layout weight of a CPU-packed one, exactly (the inverse's re-quantized statistics, which are
    not exact, are computed on a throwaway copy of `state` and dropped)."""
    shadow = copy.copy(state)
    shadow.original_nested = False
    weight, _ = bnbf._convert_weight_packed_for_cpu_inverse(packed, shadow)
    return weight


def unpack(packed: torch.Tensor, state: bnbf.QuantState) -> tuple[torch.Tensor, bnbf.QuantState]:
    """bitsandbytes' own inverse of the repack, edits `state` in place: the weight is exact, double-quant
    statistics are re-quantized from the bf16 absmax (not the bytes that were loaded)."""
    return bnbf._convert_weight_packed_for_cpu_inverse(packed, state)


def mark_cpu_packed(state: bnbf.QuantState, nested: bool, packed: torch.Tensor) -> None:
    """Set the fields bitsandbytes' repack sets, on a state whose absmax is already the packed bf16 one."""
    state.original_dtype, state.original_nested = state.dtype, nested
    state.original_qshape = torch.Size([packed.numel(), 1])
    state.dtype, state.packing_format_for_cpu = torch.bfloat16, True


# -- bitsandbytes: the CPU 4-bit kernel, called directly -----------------------------------------------------
_GEMV_ARGS = (ct.c_int64, ct.c_int64, ct.c_int64, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_int64,
              ct.c_int64, ct.c_int64)  # M, N, K, x, weight, absmax, out, blocksize, x row stride, out row stride
Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


@cache
def _typed_kernel(name: str) -> Callable[..., None]:
    """bitsandbytes' C function behind a typed prototype: plain ints go in without building ctypes objects."""
    from bitsandbytes.cextension import lib

    return ct.CFUNCTYPE(None, *_GEMV_ARGS)(ct.cast(getattr(lib, name), ct.c_void_p).value)


def gemv_4bit_kernels() -> dict[str, Gemv] | None:
    """quant type -> out[M, N] = x[M, K] @ dequant(weight)^T for a CPU-packed bf16 weight, all contiguous bf16;
    None on untested versions or a bitsandbytes build without the CPU 4-bit kernels."""
    if not SUPPORTED:
        return None
    try:
        raw = {t: _typed_kernel(f"gemv_4bit_inference_cpu_{t}_bf16") for t in ("nf4", "fp4")}
    except (AttributeError, RuntimeError):
        return None

    def bind(kernel: Callable[..., None]) -> Gemv:
        def gemv(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor,
                 blocksize: int) -> None:
            m, k = x.shape
            n = out.shape[-1]
            kernel(m, n, k, x.data_ptr(), weight.data_ptr(), absmax.data_ptr(), out.data_ptr(), blocksize, k, n)
        return gemv

    return {t: bind(kernel) for t, kernel in raw.items()}


# -- torch: oneDNN's packed linear and the int8 matmul --------------------------------------------------------
def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A [out, in] CPU weight reordered into oneDNN's blocked layout (an opaque tensor), or None where this torch
    has no oneDNN linear ops or the versions are untested."""
    if not SUPPORTED or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias on the weight `onednn_pack` returned."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_nbytes(packed: torch.Tensor) -> int:
    """Bytes an opaque oneDNN tensor holds (padding included; it has no storage to ask)."""
    return int(torch.ops.mkldnn._nbytes(packed))


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32, as bitsandbytes computes it on AVX-512 CPUs."""
    return torch._int_mm(a, b_t)
