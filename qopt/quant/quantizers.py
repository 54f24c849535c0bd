"""Byte-exact, faster CPU versions of bitsandbytes' weight quantizers.

bitsandbytes quantizes 4-bit on CPU with plain torch ops over the whole tensor; 60% of its time is one
`torch.bucketize` (a scalar binary search per weight). Here the same float32 arithmetic runs on cache-sized
chunks, in threads, and the bucket comes from a 65,536-entry table indexed by the top 16 bits of the scaled
value: each table cell (a contiguous range of floats) holds at most one bucket bound, so
`bucket = table_low[cell] + (x > table_bound[cell])` equals `bucketize(x, bounds)` for every value the clamp to
[-1, 1] can produce, NaN included.
The output bytes equal `bitsandbytes.functional.quantize_4bit`'s (tests/test_quantization.py checks them).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from bitsandbytes.functional import QuantState, get_4bit_type, int8_vectorwise_quant
from bitsandbytes.functional import quantize_4bit as bnb_quantize_4bit

from . import internals
from .formats import BLOCKSIZE, double_quantize, rounding_tables

CHUNK = 1 << 17  # elements per step: float32 temporaries of 512 KiB stay in L2; op overheads amortized


@cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per 16-bit cell of the float32 pattern: the bucket of its lowest value and the one bound inside it."""
    _, bounds, order = rounding_tables(quant_type)
    top = torch.arange(1 << 16, dtype=torch.int32)
    first = (top << 16).view(torch.float32)
    last = ((top << 16) | 0xFFFF).view(torch.float32)
    low, high = torch.minimum(first, last), torch.maximum(first, last)
    q_low, q_high = torch.bucketize(low, bounds), torch.bucketize(high, bounds)
    nan = torch.isnan(low)
    q_high[nan] = q_low[nan] = torch.bucketize(torch.tensor([float("nan")]), bounds)
    if (q_high - q_low).max() > 1:
        raise AssertionError(f"{quant_type}: a 16-bit float cell holds two bucket bounds")
    inside = bounds[q_low.clamp(max=len(bounds) - 1)]
    bound = torch.where(q_high > q_low, inside, torch.full_like(inside, float("inf")))
    remap = None if torch.equal(order, torch.arange(len(order))) else order.to(torch.uint8)
    return q_low.to(torch.uint8), bound.contiguous(), remap


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _quantize_span(flat: torch.Tensor, start: int, stop: int, blocksize: int, quant_type: str,
                   dtype: torch.dtype, out: torch.Tensor, absmax: torch.Tensor) -> None:
    """Quantize full blocks [start, stop) of `flat` (cast to `dtype` first) into `out` and `absmax`."""
    q_low, bound, remap = _tables(quant_type)
    for s in range(start, stop, CHUNK):
        e = min(s + CHUNK, stop)
        block = flat[s:e].to(dtype).to(torch.float32, copy=True).view(-1, blocksize)  # scaled in place below
        peak = torch.linalg.vector_norm(block, float("inf"), dim=-1)  # max |x|, exactly (NaN propagates)
        absmax[s // blocksize:e // blocksize] = peak
        # bitsandbytes: clamp(A * (1.0 / absmax.clamp(min=1e-38)), -1, 1); 1.0 / t is t.reciprocal() in torch
        scale = peak.clamp_(min=1e-38).reciprocal_()
        scaled = block.mul_(scale.view(-1, 1)).clamp_(-1, 1).view(-1)
        _codes_into(scaled, q_low, bound, remap, out[s // 2:e // 2])


def _codes_into(scaled: torch.Tensor, q_low: torch.Tensor, bound: torch.Tensor, remap: torch.Tensor | None,
                out: torch.Tensor) -> None:
    cell = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    codes = q_low.index_select(0, cell)
    codes.add_(torch.gt(scaled, bound.index_select(0, cell)))
    if remap is not None:
        codes = remap.index_select(0, codes.int())
    pairs = codes.view(-1, 2)
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=out)  # first code in the high nibble


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                  compress_statistics: bool = False, quant_storage: torch.dtype = torch.uint8,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, QuantState]:
    """Same result as `bitsandbytes.functional.quantize_4bit(weight.to(dtype), ...)` on CPU, several times faster.

    `dtype` (default: the weight's) is the dtype the weight is cast to first, chunk by chunk, as transformers
    casts a checkpoint to the model's dtype before quantizing; the quant state records it. On bitsandbytes
    versions qopt was not tested on (`internals.SUPPORTED`), bitsandbytes' own quantizer runs.
    """
    dtype = dtype or weight.dtype
    if weight.device.type != "cpu" or blocksize % 2 or CHUNK % blocksize or not internals.SUPPORTED:
        return bnb_quantize_4bit(weight.to(dtype), blocksize=blocksize, compress_statistics=compress_statistics,
                         quant_type=quant_type, quant_storage=quant_storage)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    out = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    steps = range(0, full, CHUNK)
    workers = min(_threads(), len(steps))
    if workers > 1:
        per = -(-len(steps) // workers) * CHUNK
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda s: _quantize_span(flat, s, min(s + per, full), blocksize, quant_type, dtype, out,
                                                   absmax), range(0, full, per)))
    elif full:
        _quantize_span(flat, 0, full, blocksize, quant_type, dtype, out, absmax)
    if full < n:  # the partial last block, with bitsandbytes' own arithmetic (a division, zero padding)
        tail = flat[full:].to(dtype).float()
        peak = tail.abs().max()
        absmax[-1] = peak
        scaled = torch.clamp(tail / peak.clamp(min=1e-38), -1, 1)
        scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))
        q_low, bound, remap = _tables(quant_type)
        _codes_into(scaled, q_low, bound, remap, out[full // 2:])
    packed = out.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = out.view(quant_storage).unsqueeze(1)
    code = get_4bit_type(quant_type, device=weight.device)
    if compress_statistics:
        nested_absmax, state2, offset = double_quantize(absmax)
        return packed, QuantState(absmax=nested_absmax, shape=weight.shape, dtype=dtype, blocksize=blocksize,
                                  code=code, quant_type=quant_type, offset=offset, state2=state2)
    return packed, QuantState(absmax=absmax, shape=weight.shape, dtype=dtype, blocksize=blocksize, code=code,
                              quant_type=quant_type)


def quantize_int8_rows(weight: torch.Tensor, dtype: torch.dtype | None = None, rows_per_step: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() row-wise weight quantization as `Int8Params` does it (cast to `dtype`, then float16), by rows.

    Row-wise statistics make chunks independent, so the bytes equal one whole-tensor call while the float16
    and float32 temporaries stay small.
    """
    rows = weight.shape[0]
    dtype = dtype or weight.dtype
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for s in range(0, rows, rows_per_step):
        e = min(s + rows_per_step, rows)
        c, scb, _ = int8_vectorwise_quant(weight[s:e].to(dtype).to(torch.float16).contiguous())
        codes[s:e], scales[s:e] = c, scb
    return codes, scales
