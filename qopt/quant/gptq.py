"""GPTQ rounding of one weight matrix onto bitsandbytes' exact storage grids (NF4, FP4, LLM.int8).

Round-to-nearest treats every weight alike; the output error of a linear layer is ||(W - Q) X||^2, which
weighs errors by the input statistics H = 2 X^T X. GPTQ (Frantar et al., 2022) rounds one input column at a
time and moves each column's rounding error onto the columns not yet rounded, in proportion to the inverse
Hessian, so the errors cancel on the calibration inputs. Here the grid is not GPTQ's uniform one but
bitsandbytes' own: 4-bit blocks of 64 consecutive weights of a row scaled by their absmax (optionally
double-quantized), or int8 rows scaled by their absmax (SCB). The codes therefore pack into bytes that plain
`bnb.nn.Linear4bit` / `Linear8bitLt` read unchanged; with zero error feedback they equal `quantize_4bit`'s.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from bitsandbytes import functional as bnbf

from .formats import BLOCKSIZE, double_quantize, rounding_tables

logger = logging.getLogger(__name__)
QUANT_TYPES = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Grid:
    """A bitsandbytes storage format the rounding must land on exactly."""

    quant_type: str = "nf4"  # "nf4" | "fp4" | "int8"
    double_quant: bool = False
    blocksize: int = BLOCKSIZE

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type {self.quant_type!r}: expected one of {QUANT_TYPES}")
        if self.double_quant and self.quant_type == "int8":
            raise ValueError("double_quant applies to 4-bit types only (nf4, fp4), not int8")

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4


@dataclass
class RoundedWeight:
    """The result of rounding one (out, in) matrix: the values optimised and the bytes that store them."""

    grid: Grid
    codes: torch.Tensor  # (out, in): uint8 positions in the sorted 4-bit code, or int8 values
    scales: torch.Tensor  # fp32 (out, in // blocksize) absmax for 4-bit (after double quant), (out,) SCB for int8
    dequantized: torch.Tensor  # fp32 (out, in): exactly what bitsandbytes dequantizes the stored bytes to
    absmax_before_dq: torch.Tensor | None = None  # 4-bit: the absmax the double quantization compressed

    def packed(self) -> torch.Tensor:
        """4-bit codes as bitsandbytes stores them: two per byte, high nibble first, shape (n / 2, 1)."""
        if self.grid.bits != 4:
            raise ValueError("packed() is for 4-bit grids; int8 codes are stored as they are")
        _, _, order = _tables(self.grid.quant_type, self.codes.device)
        stored = order.to(torch.uint8)[self.codes.reshape(-1).long()]
        if stored.numel() % 2:
            stored = torch.nn.functional.pad(stored, (0, 1))
        return ((stored[::2] << 4) | stored[1::2]).unsqueeze(1)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CB, SCB) as `Linear8bitLt` stores them: int8 (out, in) and fp32 row absmax (out,)."""
        if self.grid.bits != 8:
            raise ValueError("int8() is for the int8 grid")
        return self.codes.to(torch.int8), self.scales

    def state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors as bitsandbytes / transformers save them, keys relative to the module (no bias)."""
        if self.grid.bits == 8:
            codes, scb = self.int8()
            return {"weight": codes, "SCB": scb}
        stats = self.quant_state(dtype).as_dict(packed=True)
        return {"weight": self.packed(), **{f"weight.{k}": v for k, v in stats.items()}}

    def quant_state(self, dtype: torch.dtype) -> bnbf.QuantState:
        """The bitsandbytes QuantState describing `packed()`; `dtype` is the dequantization dtype it records."""
        if self.grid.bits != 4:
            raise ValueError("quant_state() is for 4-bit grids")
        code = bnbf.get_4bit_type(self.grid.quant_type, device="cpu")
        shape = torch.Size(self.codes.shape)
        common = dict(shape=shape, dtype=dtype, blocksize=self.grid.blocksize, code=code,
                      quant_type=self.grid.quant_type)
        if not self.grid.double_quant:
            return bnbf.QuantState(absmax=self.scales.reshape(-1).contiguous(), **common)
        qabsmax, state2, offset = double_quantize(self.absmax_before_dq.reshape(-1))
        return bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def double_quantized_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax bitsandbytes will read back after double quantization, computed with its own kernels."""
    qabsmax, state2, offset = double_quantize(absmax.reshape(-1))
    restored = bnbf.dequantize_blockwise(qabsmax, state2)
    restored += offset
    return restored.float().reshape(absmax.shape)


@cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rounding_tables` on the device the rounding runs on (GPTQ runs where its weight is)."""
    return tuple(t.to(device) for t in rounding_tables(quant_type))  # type: ignore[return-value]


def _round_4bit(w: torch.Tensor, absmax: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code for each row's weight, with bitsandbytes' arithmetic (reciprocal, clamp, bucketize)."""
    values, bounds, _ = _tables(quant_type, w.device)
    scaled = torch.clamp(w * (1.0 / _nonzero(absmax)), -1, 1)
    idx = torch.bucketize(scaled, bounds)
    return idx, values[idx] * absmax


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """bitsandbytes clamps absmax at 1e-38 before its reciprocal; keep the sign of a (double-quantized) negative."""
    return torch.where(scale.abs() < 1e-38, torch.full_like(scale, 1e-38), scale)


def _round_int8(w: torch.Tensor, scb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise: round(w * 127 / SCB), clamped since error feedback can push |w| past SCB."""
    inv = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    idx = torch.round(w * inv).clamp_(-127, 127)
    return idx, idx * (scb / 127.0)


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 in fp32, as GPTQ computes it. `h` (a private copy) is damped
    and then overwritten in place, so only three (in, in) matrices ever coexist; the damping (a fraction of
    the mean diagonal) grows tenfold until H + damp I is positive definite."""
    diagonal = torch.diagonal(h)
    damp, added = percdamp * float(diagonal.mean().clamp(min=1e-12)), 0.0
    for _ in range(6):
        diagonal.add_(damp - added)
        added = damp
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            torch.cholesky_inverse(lower, out=h)
            del lower
            upper, info = torch.linalg.cholesky_ex(h, upper=True)
            if info != 0:
                raise ValueError(f"inverse Hessian ({h.shape[0]} inputs) lost positive definiteness in fp32")
            return upper
        logger.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise ValueError(f"Hessian ({h.shape[0]} inputs) is not positive definite even with damping {damp:.3g}")


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid, *, percdamp: float = 0.01,
               block_columns: int = 128, clip_search: int = 0, act_order: bool = False) -> RoundedWeight:
    """Round `weight` (out, in) onto `grid`, compensating errors through `hessian` (in, in); None = no feedback.

    4-bit blocks take their absmax from the error-updated weights when their first column is reached. With
    double quantization the stored absmax is only known once every block's is: a first pass finds them,
    bitsandbytes compresses them, and a second pass rounds against the decompressed absmax, so what is
    stored is exactly what was optimised.

    `clip_search` > 0 tries that many absmax shrink factors in [0.75, 1] per 4-bit block (bitsandbytes stores
    any absmax, not only the block's maximum) and keeps the one with the least diag(H)-weighted error.
    `act_order` rounds the columns with the largest Hessian diagonal first (GPTQ's "desc_act"); the blocks'
    absmax are then fixed from the float weights beforehand, since a block's columns are no longer adjacent.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(weight.shape)}")
    in_features = weight.shape[1]
    if grid.bits == 4 and in_features % grid.blocksize:
        raise ValueError(f"in_features {in_features} is not a multiple of the block size {grid.blocksize}: "
                         f"bitsandbytes' blocks would straddle rows")
    if block_columns % grid.blocksize and grid.bits == 4:
        raise ValueError(f"block_columns {block_columns} must be a multiple of the block size {grid.blocksize}")
    # LLM.int8 quantizes the fp16 weight: start from it so the row scales (SCB) are bitsandbytes' own
    w = weight.detach().to(torch.float16 if grid.bits == 8 else torch.float32).float().clone()
    factor, importance, order = None, torch.ones(in_features, device=w.device), None
    if hessian is not None:
        h = hessian.detach().float().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        importance = torch.diag(h)
        if act_order:
            order = torch.argsort(importance, descending=True)
            h = h[order][:, order]
        factor = _inverse_hessian_factor(h, percdamp)
        del h
    choose = _absmax_chooser(grid.quant_type, clip_search, importance)
    static, raw = None, None
    if grid.bits == 8:
        static = w.abs().amax(dim=1)
    elif order is not None:
        blocks = w.reshape(w.shape[0], -1, grid.blocksize)
        raw = torch.stack([choose(blocks[:, g], g * grid.blocksize) for g in range(blocks.shape[1])], dim=1)
        static = double_quantized_absmax(raw) if grid.double_quant else raw
    result = _gptq_pass(w, factor, grid, block_columns, static, choose, order)
    if grid.bits == 4 and grid.double_quant:
        if raw is None:  # scales found on the way: round again against their compressed form
            raw = result.scales
            result = _gptq_pass(w, factor, grid, block_columns, double_quantized_absmax(raw), choose)
        result.absmax_before_dq = raw
    return result


def _absmax_chooser(quant_type: str, steps: int, importance: torch.Tensor
                    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """absmax of a (rows, blocksize) block starting at column `col`: its maximum, or the best shrink of it."""
    if steps <= 0:
        return lambda block, col: block.abs().amax(dim=1)
    factors = torch.linspace(1.0, 0.75, steps, device=importance.device)

    def choose(block: torch.Tensor, col: int) -> torch.Tensor:
        weights = importance[col:col + block.shape[1]]
        candidates = factors[:, None] * block.abs().amax(dim=1)[None]  # (steps, rows)
        _, q = _round_4bit(block[None], candidates[..., None], quant_type)
        err = (((block[None] - q) ** 2) * weights).sum(-1)
        best = err.argmin(dim=0)
        return candidates.gather(0, best[None])[0]

    return choose


def _gptq_pass(w: torch.Tensor, factor: torch.Tensor | None, grid: Grid, block_columns: int,
               static: torch.Tensor | None, choose_absmax: Callable[[torch.Tensor, int], torch.Tensor],
               order: torch.Tensor | None = None) -> RoundedWeight:
    """One sweep over the columns (in `order` when given) with lazy batch updates of `block_columns`.

    `static` holds fixed scales: (rows,) SCB for int8 or (rows, blocks) absmax for 4-bit; without them each
    4-bit block's absmax is chosen from the updated weights at its first column.
    """
    rows, cols = w.shape
    four_bit = grid.bits == 4
    order = torch.arange(cols, device=w.device) if order is None else order
    w = w[:, order].clone()
    codes = torch.zeros(rows, cols, dtype=torch.uint8 if four_bit else torch.int8, device=w.device)
    q_all = torch.zeros_like(w)
    scales = static.clone() if static is not None else torch.zeros(rows, cols // grid.blocksize, device=w.device)
    columns = order.tolist()  # plain ints: indexing a GPU tensor per column would sync every time
    for i1 in range(0, cols, block_columns):
        i2 = min(i1 + block_columns, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = factor[i1:i2, i1:i2] if factor is not None else None
        for i in range(i2 - i1):
            col = columns[i1 + i]
            if not four_bit:
                idx, q = _round_int8(w1[:, i], scales)
            else:
                group = col // grid.blocksize
                if static is None and col % grid.blocksize == 0:
                    scales[:, group] = choose_absmax(w1[:, i:i + grid.blocksize], col)
                idx, q = _round_4bit(w1[:, i], scales[:, group], grid.quant_type)
            codes[:, col] = idx
            q_all[:, i1 + i] = q
            if hinv1 is None:
                continue
            d = hinv1[i, i]
            err = (w1[:, i] - q) / d
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        if factor is not None and i2 < cols:
            w[:, i2:] -= err1 @ factor[i1:i2, i2:]
    dequantized = torch.empty_like(q_all)
    dequantized[:, order] = q_all
    return RoundedWeight(grid, codes, scales, dequantized)


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / 2 = the mean squared output error on the inputs H was built from (H = 2 X^T X / n)."""
    delta = (weight.float() - dequantized.float())
    return float(((delta @ hessian.float()) * delta).sum()) / 2


class HessianAccumulator:
    """Running H = 2 X^T X / n over every token a Linear sees; used as a forward hook."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total

    def pre_hook(self, stop: bool = False) -> Callable[[torch.nn.Module, tuple], None]:
        """A forward pre-hook that accumulates the module's input; with `stop`, it then raises StopForward so
        a calibration forward ends where no later module's input is needed."""

        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.add(args[0])
            if stop:
                raise StopForward

        return hook


class StopForward(Exception):
    """Raised by a Hessian pre-hook to end a forward pass once the inputs it needs are collected."""
