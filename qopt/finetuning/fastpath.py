"""A faster QLoRA step: the frozen tied embedding / output head kept in the compute dtype.

`prepare_for_kbit_training` (PEFT's recipe) upcasts every unquantized tensor to fp32, the tied embedding
included, so the output head multiplies tokens x hidden by hidden x vocab in fp32, forward and backward. On
OPT-125M (batch 4 x 128, one CPU thread) those two matmuls are about half of a 2.1 s step, and in bfloat16 they
take a third of the time on a CPU with bf16 instructions. The head is frozen, so fp32 buys it nothing but
precision of logits that the loss upcasts anyway; norms and biases, which LoRA's small updates flow through,
stay fp32. The residual stream stays fp32: the embedding's output is upcast, the head's input cast down.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..quant.modules import is_quantized


def compute_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype the model's 4-bit linears compute in, or None (no 16-bit 4-bit compute)."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None) if is_quantized(module) else None
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


def half_precision_head(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Keep a frozen, tied input embedding / output head in `dtype` (default: the 4-bit compute dtype) after
    `prepare_for_kbit_training`; returns whether anything changed (not for an untied or trainable head)."""
    dtype = dtype or compute_dtype_of(model)
    embedding = model.get_input_embeddings()
    head = getattr(model, "lm_head", None)
    if dtype is None or head is None or head.weight is not embedding.weight or embedding.weight.requires_grad:
        return False
    embedding.weight.data = embedding.weight.data.to(dtype)
    if getattr(model, "_half_head_hooks", None) is None:
        up = embedding.register_forward_hook(lambda _m, _i, out: out.float())
        down = head.register_forward_pre_hook(_cast_input)
        model._half_head_hooks = (up, down)
    return True


def _cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].to(module.weight.dtype), *args[1:])
