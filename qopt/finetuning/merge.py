"""Folding a LoRA adapter into its base weights: every merge qopt performs is built here.

`merge_into_base` adds B @ A * scaling to each targeted weight in that weight's own format: a quantized base
is dequantized, summed in fp32 and quantized again, so its merged weight carries a rounding error that the
`MergeReport` gives per layer. A QLoRA adapter was trained against the *dequantized* 4-bit weights, so its
exact merge is W_deq + B @ A in float: `merge_into_float` builds that model (every quantized Linear replaced
by its dequantized float weight, then the update added in fp32), and `merged_float_model` does so from the
base and adapter folders, with the base loaded as the adapter was trained on it (`training_quantization`).
Re-quantizing a merged model (GPTQ calibration is a sibling feature) and measuring what a merge kept of the
adapter's gain belong to `qopt.evaluation.merge_quality`, which composes these.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..loading.loader import load
from ..quant.modules import config_of, dequantize_weight, is_quantized, quantize_linear
from .adapters import load_adapter
from .lora import adapter_set, delete_adapter, lora_layers, saved_modules, set_adapter
from .resume import CHECKPOINT_DIR, TRAINER_STATE


@dataclass
class MergeReport:
    """How far each merged weight is from the exact float sum W + B @ A * scaling (zero for fp32 bases)."""

    adapter: str
    max_abs_error: dict[str, float] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)  # ||merged - exact|| / ||exact|| (Frobenius)
    quality: Any = None  # a qopt.MergeQuality when the merge was measured (qopt.merge_and_unload(measure=True))

    @property
    def worst_abs_error(self) -> float:
        return max(self.max_abs_error.values(), default=0.0)

    @property
    def worst_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)

    def summary(self) -> str:
        return (f"merged adapter '{self.adapter}' into {len(self.max_abs_error)} layers: max abs error "
                f"{self.worst_abs_error:.3g}, max relative error {self.worst_rel_error:.3g} vs the float sum"
                + (f"\n{self.quality.summary()}" if self.quality is not None else ""))


def adapter_to_merge(model: nn.Module, adapter_name: str | None = None) -> str:
    """The adapter a merge folds in (`adapter_name`, else the active one), made active; checked before any
    weight changes, so a bad name leaves the model as it was."""
    adapters = adapter_set(model)
    name = adapter_name or adapters.active
    if name not in adapters.configs:
        raise AdapterError(f"no adapter named {name!r} to merge (have {sorted(adapters.configs)})")
    set_adapter(model, name)
    return name


def merge_linear(base: nn.Linear, delta: torch.Tensor) -> tuple[nn.Linear, float, float]:
    """Add `delta` to a Linear's weight; returns the (new, for quantized) module and its max / relative error."""
    with torch.no_grad():
        if is_quantized(base):
            exact = dequantize_weight(base).float() + delta.to(base.weight.device)
            plain = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")  # no init work
            plain.weight = nn.Parameter(exact, requires_grad=False)
            if base.bias is not None:
                plain.bias = nn.Parameter(base.bias.detach().float(), requires_grad=False)
            merged = quantize_linear(plain, config_of(base))
            merged.train(base.training)
            achieved = dequantize_weight(merged).float()
        else:
            exact = base.weight.float() + delta.to(base.weight.device)
            base.weight.copy_(exact)
            merged, achieved = base, base.weight.float()
        err = achieved - exact
        rel = (err.norm() / exact.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()
    return merged, err.abs().max().item(), rel


def merge_into_base(model: nn.Module, adapter_name: str | None = None) -> MergeReport:
    """Fold an adapter into the base weights, each in its own format, for adapter-free inference, and drop all
    adapters. Float bases get W + B @ A * scaling exactly; a quantized base is re-quantized in its format."""
    name = adapter_to_merge(model, adapter_name)
    adapters = adapter_set(model)
    report = MergeReport(name)
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            merged, abs_err, rel_err = merge_linear(layer.base_layer, layer.delta_weight(name))
            report.max_abs_error[layer_name], report.rel_error[layer_name] = abs_err, rel_err
            layer.base_layer = merged
    for _, module in list(saved_modules(model)):
        if name in module.modules_to_save:
            module.original_module = module.modules_to_save[name]
    adapters.bias_origin.clear()  # the merged adapter's biases stay: they are part of the merged model
    adapters.active = None
    for other in list(adapters.configs):
        delete_adapter(model, other)
    return report


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
    report = merge_into_base(model, adapter_name)
    if dtype != torch.float32:
        model.to(dtype)
    return report


def training_quantization(adapter: str | os.PathLike) -> str | None:
    """The quantization preset an adapter was trained on, from its qopt training checkpoint; None when it was
    trained on a float base or the folder has no qopt checkpoint (a PEFT adapter)."""
    file = Path(adapter) / CHECKPOINT_DIR / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text())["fingerprint"]["training"].get("quantization")
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def load_adapter_model(base: str | os.PathLike, adapter: str | os.PathLike, quantization: str | None,
                       progress: bool = True, check_base: bool = True) -> nn.Module:
    """The base as the adapter was trained on it (float32 outside the quantized linears) with the adapter: the
    model a merge must reproduce. `check_base` as in `load_adapter`."""
    model = load(base, quantization=quantization, torch_dtype=None, progress=progress)
    load_adapter(model, adapter, check_base=check_base)
    return model


def merged_float_model(base: str | os.PathLike, adapter: str | os.PathLike, quantization: str | None,
                       check_base: bool = True) -> tuple[nn.Module, MergeReport]:
    """The exact float merge of an adapter folder into its base folder (loaded with `quantization`, as the
    adapter was trained), in fp32; the report gives the per-layer error (zero: nothing is rounded)."""
    model = load_adapter_model(base, adapter, quantization, progress=False, check_base=check_base)
    return model, merge_into_float(model)
