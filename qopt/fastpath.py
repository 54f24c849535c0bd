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

import ctypes as ct
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

PACK_HEAD_MIN_TOKENS = 16  # packing the head costs about as much as 10-20 steps' head matmuls


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
    """The output head on a oneDNN-packed copy of its weight (twice as fast at a few rows; bit-identical in bf16,
    within rounding in fp32), or None where it does not apply. The copy lives as long as the returned function."""
    weight = getattr(head, "weight", None)
    if not (type(head) is nn.Linear and _free(head) and weight.device.type == "cpu" and new_tokens >= PACK_HEAD_MIN_TOKENS
            and weight.dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):  # a torch build without oneDNN's linear ops: keep the plain matmul
        return None
    bias = head.bias
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def lean_4bit_forward(module: bnb.nn.Linear4bit) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """bitsandbytes' CPU 4-bit kernel called directly: what `Linear4bit.forward` computes once its first eval forward
    has packed the weight for the CPU (bf16 compute), minus the layers of Python around it."""
    if not _free(module):
        return None
    from bitsandbytes.cextension import lib

    own = module.forward
    kernels = {"nf4": lib.gemv_4bit_inference_cpu_nf4_bf16, "fp4": lib.gemv_4bit_inference_cpu_fp4_bf16}
    out_features, in_features = module.out_features, module.in_features
    n, k = ct.c_int64(out_features), ct.c_int64(in_features)

    def forward(x: torch.Tensor) -> torch.Tensor:
        state = getattr(module.weight, "quant_state", None)
        bias = module.bias
        if (module.training or x.device.type != "cpu" or x.requires_grad or state is None
                or module.compute_dtype is not torch.bfloat16
                or not getattr(state, "packing_format_for_cpu", False) or x.dtype not in (torch.bfloat16, torch.float32)
                or (bias is not None and bias.dtype != torch.bfloat16)):
            return own(x)
        a = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
        out = torch.empty(a.shape[0], out_features, dtype=torch.bfloat16)
        kernels[state.quant_type](ct.c_int64(a.shape[0]), n, k, ct.c_void_p(a.data_ptr()),
                                  ct.c_void_p(module.weight.data_ptr()), ct.c_void_p(state.absmax.data_ptr()),
                                  ct.c_void_p(out.data_ptr()), ct.c_int64(state.blocksize), ct.c_int64(a.stride(0)),
                                  ct.c_int64(out.stride(0)))
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], out_features).to(x.dtype)

    return forward


def lean_int8_forward(module: bnb.nn.Linear8bitLt) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """LLM.int8 inference as `Linear8bitLt.forward` computes it on CPU, without its autograd function, per-call
    warning and five dispatched ops (about 100 tensor ops per call in all)."""
    if module.state.has_fp16_weights or not _free(module):
        return None
    own = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        state, bias = module.state, module.bias
        if module.training or x.requires_grad or x.device.type != "cpu" or state.CB is None or x.numel() == 0 \
                or (bias is not None and bias.dtype != x.dtype):
            return own(x)  # also the first call, which moves the weight into `state`
        out = int8_matmul(x.reshape(-1, x.shape[-1]), state.CB, state.SCB, state.threshold, bias)
        return out.view(*x.shape[:-1], state.CB.shape[0])

    return forward


def int8_matmul(a: torch.Tensor, codes_b: torch.Tensor, scales_b: torch.Tensor, threshold: float,
                bias: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes' default int8 ops (int8_vectorwise_quant, int8_scaled_mm, int8_mixed_scaled_mm), op for op:
    rows of the fp16-cast input quantized by their absmax after zeroing outliers (|x| >= threshold), an int8
    matmul, rescaling, and the outlier columns added back in the input's precision."""
    a16 = a.to(torch.float16)
    magnitude = a16.abs()
    columns = None
    if threshold > 0.0:
        outliers = magnitude >= threshold
        columns = torch.empty(0, dtype=torch.long, device=a.device)
        if outliers.any():
            columns = torch.argwhere(outliers.any(dim=0)).view(-1)
            a16, magnitude = a16.masked_fill(outliers, 0), magnitude.masked_fill(outliers, 0)
    row_scales = torch.max(magnitude, dim=1).values.float()
    codes_a = torch.round(a16 * (127.0 / row_scales.unsqueeze(-1))).to(torch.int8)
    if a.shape[0] > 1 and columns is not None:
        codes_a[:, columns] = 0
    out = torch._int_mm(codes_a, codes_b.t()) * (row_scales.unsqueeze(-1) * scales_b.unsqueeze(0)) * 6.200124e-05
    if bias is not None:
        out += bias
    out = out.to(a.dtype)
    if columns is not None and columns.numel():
        dequantized = codes_b[:, columns].contiguous() * scales_b.view(-1, 1) * 7.874015718698502e-3
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
        for module in model.modules():
            fast = lean_4bit_forward(module) if isinstance(module, bnb.nn.Linear4bit) else \
                lean_int8_forward(module) if isinstance(module, bnb.nn.Linear8bitLt) else None
            if fast is not None:
                stack.enter_context(replaced_forward(module, fast))
        yield
