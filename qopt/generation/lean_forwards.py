"""Decode-time fast paths: the same kernels and the same numbers, with less Python per token.

At one token per row a small OPT's decode step is dominated by fixed costs, not arithmetic: bitsandbytes'
module -> autograd function -> registered op -> ctypes chain costs tens of microseconds per Linear (more than the
4-bit kernel itself for a 768 x 768 layer), its int8 path logs a warning on every call, and the output head (kept
in 16 bits) is read in a layout oneDNN streams at half speed. `decode_fast_paths(model)` swaps, for the length of
one generate call, each module's forward for a lean one that calls the same kernel with the same arguments, so
outputs are bit-identical; anything unusual (training mode, gradients, another device, an unpacked 4-bit weight)
goes through the module's own forward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

from ..place.sizes import PACKED_HEAD_CACHE_MAX_BYTES
from ..quant import internals

PACK_HEAD_MIN_TOKENS = 32  # repacking the head costs about what it saves over 20 decode steps (docs/benchmarks.md)
# the packed head is kept on the module between calls (a second copy of its weight, e.g. of the tied embedding)
# up to this size; a larger head is packed for each call and freed after it, as memory is scarcer there
PACKED_HEAD_ATTRIBUTE = "_packed_head"  # (weight key, oneDNN-packed weight) on the head module
# bitsandbytes multiplies int8 with torch._int_mm only on AVX-512 CPUs (elsewhere in fp32, which can round)
_INT_MM = torch.backends.cpu.get_cpu_capability() == "AVX512"
# bitsandbytes' own literals (backends/default/ops.py, _ops.py), copied as written so the numbers match its ops
# bit for bit: neither is the exact float64 value (1 / 127**2 = 6.2000124e-05; 1 / 127 rounded to float32)
INT8_PRODUCT_SCALE = 6.200124e-05  # 1 / 127**2: an int8 x int8 product, times both row scales, back to float
INT8_CODE_SCALE = 7.874015718698502e-3  # 1 / 127: an int8 weight code, times its row scale, back to float


@contextmanager
def replaced_forward(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Give one module instance another forward, restoring its own afterwards."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _free(module: nn.Module) -> bool:
    """No instance-level forward already (accelerate hooks, LoRA or a user patch own it then)."""
    return "forward" not in vars(module)


def packed_head_forward(head: nn.Module, new_tokens: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The output head on a oneDNN-packed copy of its weight (faster at a few rows, docs/benchmarks.md;
    bit-identical in bf16, within rounding in fp32), or None where it does not apply. A head of up to
    `PACKED_HEAD_CACHE_MAX_BYTES` keeps its copy for the next call (`packed_head`); a larger one's copy lives as
    long as the returned function, so memory returns to normal after generate."""
    weight = getattr(head, "weight", None)
    if not (type(head) is nn.Linear and _free(head) and weight.device.type == "cpu"
            and new_tokens >= PACK_HEAD_MIN_TOKENS and weight.dtype in (torch.bfloat16, torch.float32)):
        return None
    packed = packed_head(head)
    if packed is None:  # a torch build without oneDNN's linear ops, or untested versions: keep the plain matmul
        return None
    bias = head.bias
    return lambda x: internals.onednn_linear(x, packed, bias)


def _weight_key(weight: torch.Tensor) -> tuple:
    """What a packed copy was made from: storage, in-place edits (version counter), dtype, shape, device."""
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), weight.device


def packed_head(head: nn.Module) -> torch.Tensor | None:
    """The head's weight in oneDNN's layout: the copy cached on the module while its weight is unchanged (same
    storage, no in-place edit), packed anew otherwise; cached only up to `PACKED_HEAD_CACHE_MAX_BYTES`."""
    weight = head.weight
    key = _weight_key(weight)
    cached = getattr(head, PACKED_HEAD_ATTRIBUTE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    drop_packed_head(head)
    packed = internals.onednn_pack(weight)
    if packed is not None and weight.numel() * weight.element_size() <= PACKED_HEAD_CACHE_MAX_BYTES:
        setattr(head, PACKED_HEAD_ATTRIBUTE, (key, packed))
    return packed


def drop_packed_head(head: nn.Module) -> None:
    """Free a head's cached packed copy, if it has one."""
    vars(head).pop(PACKED_HEAD_ATTRIBUTE, None)


def lean_4bit_forward(module: bnb.nn.Linear4bit) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """bitsandbytes' CPU 4-bit kernel called directly: what `Linear4bit.forward` computes once its first eval forward
    has packed the weight for the CPU (bf16 compute), minus the layers of Python around it."""
    if not _free(module):
        return None
    own = module.forward
    kernels = internals.gemv_4bit_kernels()
    if kernels is None:  # a bitsandbytes build without the CPU 4-bit kernels, or untested versions
        return None
    n, k = module.out_features, module.in_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        state = getattr(module.weight, "quant_state", None)
        bias = module.bias
        if (module.training or x.device.type != "cpu" or x.requires_grad or state is None
                or module.compute_dtype is not torch.bfloat16
                or not internals.is_cpu_packed(state) or x.dtype not in (torch.bfloat16, torch.float32)
                or (bias is not None and bias.dtype != torch.bfloat16)):
            return own(x)
        a = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        kernels[state.quant_type](a, module.weight, state.absmax, out.view(-1, n), state.blocksize)
        if bias is not None:
            out += bias
        return out.to(x.dtype)

    return forward


class RowQuantizer:
    """LLM.int8's activation quantization, remembered for the last input: q_proj, k_proj and v_proj read the same
    hidden states, which bitsandbytes quantizes three times over (with the same result)."""

    def __init__(self) -> None:
        self._last: tuple | None = None

    def __call__(self, x: torch.Tensor, threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and last[2] == threshold:
            return last[3]
        codes = quantize_rows(x.reshape(-1, x.shape[-1]), threshold)
        self._last = (x, x._version, threshold, codes)  # holding x keeps its identity from being reused
        return codes


def quantize_rows(a: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' int8_vectorwise_quant on the fp16-cast rows: (codes, row absmax as a column, outlier columns
    or None).

    Outliers (|x| >= threshold) are zeroed before the absmax; with several rows their columns are zeroed too.
    A row has outliers only if its absmax reaches the threshold, so the common case skips the outlier search:
    at one token per call the fixed cost of each tensor op is what decode time is made of."""
    a16 = a.to(torch.float16)
    magnitude = a16.abs()
    row_max = torch.amax(magnitude, dim=1, keepdim=True)
    columns = None
    if threshold > 0.0:
        columns = _NO_COLUMNS
        if (row_max.item() if row_max.numel() == 1 else row_max.max().item()) >= threshold:
            outliers = magnitude >= threshold
            columns = torch.argwhere(outliers.any(dim=0)).view(-1)
            a16, magnitude = a16.masked_fill(outliers, 0), magnitude.masked_fill(outliers, 0)
            row_max = torch.amax(magnitude, dim=1, keepdim=True)
    row_scales = row_max.float()
    codes = torch.round(a16 * (127.0 / row_scales)).to(torch.int8)
    if a.shape[0] > 1 and columns is not None and columns.numel():
        codes[:, columns] = 0
    return codes, row_scales, columns


_NO_COLUMNS = torch.empty(0, dtype=torch.long)  # read-only by contract: no outlier column in this input


def lean_int8_forward(module: bnb.nn.Linear8bitLt, quantizer: RowQuantizer | None = None
                      ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """LLM.int8 inference as `Linear8bitLt.forward` computes it on CPU, without its autograd function, per-call
    warning and five dispatched ops (about 100 tensor ops per call in all)."""
    if module.state.has_fp16_weights or not _free(module) or not internals.SUPPORTED:
        return None
    own = module.forward
    quantizer = quantizer or RowQuantizer()
    cached: list = [None, None, None]  # CB and SCB the views were made from, (CB.t(), SCB as a row)

    def forward(x: torch.Tensor) -> torch.Tensor:
        state, bias = module.state, module.bias
        if module.training or x.requires_grad or x.device.type != "cpu" or state.CB is None or x.numel() == 0 \
                or (bias is not None and bias.dtype != x.dtype):
            return own(x)  # also the first call, which moves the weight into `state`
        if cached[0] is not state.CB or cached[1] is not state.SCB:
            cached[:] = [state.CB, state.SCB, (state.CB.t(), state.SCB.unsqueeze(0))]
        out = int8_matmul(x.reshape(-1, x.shape[-1]), quantizer(x, state.threshold), state.CB, state.SCB, bias,
                          cached[2])
        return out.view(*x.shape[:-1], state.CB.shape[0])

    return forward


def int8_matmul(a: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                codes_b: torch.Tensor, scales_b: torch.Tensor, bias: torch.Tensor | None,
                views: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """bitsandbytes' int8_scaled_mm / int8_mixed_scaled_mm, op for op: the int8 matmul of the quantized rows,
    rescaling, and the outlier columns added back in the input's precision. `views`: (codes_b.t(), scales_b as
    a row), which a caller making many calls can keep."""
    codes_a, row_scales, columns = quantized
    codes_t, scales_row = views or (codes_b.t(), scales_b.unsqueeze(0))
    product = internals.int8_mm(codes_a, codes_t) if _INT_MM else \
        torch.ops.bitsandbytes.int8_linear_matmul.default(codes_a, codes_b)
    out = product * (row_scales * scales_row) * INT8_PRODUCT_SCALE
    if bias is not None:
        out += bias
    out = out.to(a.dtype)
    if columns is not None and columns.numel():
        dequantized = codes_b[:, columns].contiguous() * scales_b.view(-1, 1) * INT8_CODE_SCALE
        out = out.addmm(a[:, columns].contiguous(), dequantized.to(a.dtype).t())
    return out


@contextmanager
def decode_fast_paths(model: nn.Module, new_tokens: int) -> Iterator[None]:
    """Install the lean forwards on `model`'s modules for one generate call."""
    with ExitStack() as stack:
        head = getattr(model, "lm_head", None)
        fast = packed_head_forward(head, new_tokens) if head is not None else None
        if fast is not None:
            stack.enter_context(replaced_forward(head, fast))
        quantizer = RowQuantizer()  # shared: one quantization of the hidden states for q, k and v
        for module in model.modules():
            fast = lean_4bit_forward(module) if isinstance(module, bnb.nn.Linear4bit) else \
                lean_int8_forward(module, quantizer) if isinstance(module, bnb.nn.Linear8bitLt) else None
            if fast is not None:
                stack.enter_context(replaced_forward(module, fast))
        yield
