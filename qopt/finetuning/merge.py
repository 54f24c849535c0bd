"""Merging an adapter into a float copy of its base, and what a merge keeps of the adapter's gain.

A QLoRA adapter was trained against the *dequantized* 4-bit weights, so its exact merge is W_deq + B @ A in
float: `merge_into_float` builds that model (every quantized Linear replaced by its dequantized float weight,
then the LoRA deltas added in fp32). Re-quantizing it to 4 bits rounds each merged weight again, and the rank-r
update is small next to a 4-bit step, so much of it can round away; `MergeQuality` says how much.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.modules import dequantize_weight, is_quantized
from .lora import MergeReport, adapter_set, merge_and_unload

LOST_WARNING = 0.5  # warn when a merge loses more than this share of the adapter's gain


@dataclass
class MergeQuality:
    """Mean token NLLs (nats) of the base alone, the base with its adapter, and the merged model, on the same
    text; `kl` is KL(adapter model || merged model) per token where it was measured."""

    base_nll: float
    adapter_nll: float
    merged_nll: float
    kl: float | None = None
    tokens: int = 0

    @property
    def gain(self) -> float:
        """What the adapter improves over its base (positive when it helps on this text)."""
        return self.base_nll - self.adapter_nll

    @property
    def lost_fraction(self) -> float:
        """The share of the adapter's gain the merge gives back: 0 = all kept, 1 = back at the base model."""
        if self.gain <= 0:
            return math.nan  # an adapter that does not help on this text has no gain to lose
        return (self.merged_nll - self.adapter_nll) / self.gain

    def summary(self) -> str:
        kl = f", KL to the adapter model {self.kl:.5f}" if self.kl is not None else ""
        lost = "n/a (the adapter does not lower the NLL on this text)" if math.isnan(self.lost_fraction) else \
            f"{self.lost_fraction:.1%} of the adapter's gain lost"
        return (f"NLL base {self.base_nll:.5f}, adapter {self.adapter_nll:.5f} (gain {self.gain:+.5f}), merged "
                f"{self.merged_nll:.5f} ({self.merged_nll - self.adapter_nll:+.5f}){kl}: {lost}")

    def warning(self) -> str | None:
        """The message to warn with when most of the gain is gone, or None."""
        if math.isnan(self.lost_fraction) or self.lost_fraction <= LOST_WARNING:
            return None
        return (f"merging into the quantized weights lost {self.lost_fraction:.0%} of the adapter's gain "
                f"(NLL {self.adapter_nll:.4f} -> {self.merged_nll:.4f}, base {self.base_nll:.4f}); merge at 16 bits "
                f"instead: qopt merge BASE ADAPTER --bits 16 --output DIR")


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes Linear (adapter base layers included) by a float nn.Linear holding what its
    bytes mean; returns how many were replaced. The model stops being quantized."""
    names = [name for name, module in model.named_modules() if is_quantized(module)]
    for name in names:
        module = model.get_submodule(name)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(dequantize_weight(module, dtype), requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, plain.train(module.training))
    if names and hasattr(model, "config"):
        model.config.quantization_config = None
    return len(names)


def merge_into_float(model: nn.Module, adapter_name: str | None = None,
                     dtype: torch.dtype = torch.float32) -> MergeReport:
    """The exact merge of an adapter: dequantize the base in place, add B @ A * scaling in fp32, unload."""
    adapter_set(model)  # a model without adapters fails here, before anything is dequantized
    dequantize_linears(model, torch.float32)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.float()
    report = merge_and_unload(model, adapter_name)
    if dtype != torch.float32:
        model.to(dtype)
    return report
