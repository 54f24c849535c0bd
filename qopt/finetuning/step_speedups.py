"""A faster QLoRA step: the frozen tied embedding / output head kept in the compute dtype, the loss taken
through that frozen head chunk by chunk (qopt/model/head_loss.py) instead of from the full logits, and the
memory those two save spent on recomputing fewer layers (`auto_checkpointing`).

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

from ..model.network import OPTForCausalLM
from ..quant.config import QuantizationConfig
from ..quant.modules import is_quantized
from .lora import LoraConfig
from .plan import Machine, machine_preset, plan_from_configs
from .trainer import TrainingArguments


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


def fast_path(model: nn.Module, half_head: bool = True) -> tuple[str, ...]:
    """`qopt.finetune`'s speed-ups, applied after `prepare_for_kbit_training` / `add_lora`; returns their names.
    The fused loss changes no number beyond float rounding; the half-precision head is `half_precision_head`."""
    applied = ("half_head",) if half_head and half_precision_head(model) else ()
    if isinstance(model, OPTForCausalLM):
        model.fused_loss = True  # takes effect only while the head is a frozen nn.Linear
        applied += ("fused_loss",)
    return applied


def auto_checkpointing(model: nn.Module, lora: LoraConfig, batch: int, seq: int, optimizer: str = "adamw") -> int:
    """How many decoder layers (from the first) to recompute in backward: the fewest that keep this step's
    planned live tensors (fast path on) within those of PEFT's standard recipe (every layer recomputed, fp32 head,
    loss from the full logits), so the default asks no more of a GPU than the usual recipe and is faster."""
    stored = getattr(model.config, "quantization_config", None)
    quant = QuantizationConfig.from_dict(stored) if stored else None
    device = next(model.parameters()).device
    machine: Machine = machine_preset("cpu", host=1) if device.type != "cuda" else Machine(
        "this GPU", torch.cuda.get_device_properties(device).total_memory, 1, torch.cuda.is_bf16_supported())
    # the plan sizes the adapter's LoRA layers alone (its other settings do not change their memory)
    shape = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                       target_modules=lora.target_modules)
    plan = plan_from_configs(model.config, machine, quant, shape,
                             TrainingArguments(output_dir="", optimizer=optimizer, batch_size=batch), seq=seq,
                             gradient_checkpointing="auto",
                             compute_dtype=quant.bnb_4bit_compute_dtype if quant and quant.load_in_4bit else None,
                             load_dtype=torch.float32 if quant else next(model.parameters()).dtype)
    return plan.checkpointed_layers
