"""LoRA layers around any Linear (plain or bitsandbytes), their injection into a model, switching and removal.

Names follow PEFT's so adapter files are interchangeable: a targeted `q_proj` becomes a `LoraLinear` whose
`base_layer` is the original module and whose `lora_A` / `lora_B` are `ModuleDict`s keyed by adapter name; a
module in `modules_to_save` becomes a `ModulesToSave` holding `original_module` and one trainable copy per adapter.
The adapters of a model, which one is active and the base values of any bias an adapter trains live in
`model.lora_adapters` (an `AdapterSet`). Folding an adapter into its base weights is `qopt.finetuning.merge`.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from ..errors import AdapterError
from ..model.network import decoder_layer_index

DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = {"OPTForCausalLM": "CAUSAL_LM", "OPTForSequenceClassification": "SEQ_CLS",
              "OPTForQuestionAnswering": "QUESTION_ANS", "OPTModel": "FEATURE_EXTRACTION"}
SEQ_CLS_HEADS = ["classifier", "score"]  # PEFT adds these to modules_to_save for SEQ_CLS


@dataclass
class LoraConfig:
    """The LoRA hyper-parameters, with PEFT's names and defaults (adapter_config.json holds the same fields)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"LoRA field 'r' must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise AdapterError(f"LoRA field 'lora_alpha' must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"LoRA field 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise AdapterError(f"LoRA field 'bias' must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules)) if isinstance(self.target_modules, set) \
                else list(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise AdapterError(f"LoRA field 'target_modules' must be a list of names, a regex or "
                               f"'{ALL_LINEAR}', got {self.target_modules!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise AdapterError(f"LoRA field 'init_lora_weights' must be true, false or 'gaussian', "
                               f"got {self.init_lora_weights!r}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised: the update's size stops shrinking with r)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * scaling for the active adapter; `base_layer` may be any nn.Linear kind."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.training = base_layer.training  # a layer injected into an eval-mode model must not drop out

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads `.weight.device` / `.dtype` of the layer it wraps."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype, initialise: bool = True) -> None:
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            store.train(self.training)
        self.scaling[name] = config.scaling
        if not initialise or config.init_lora_weights is False:
            return  # False: both keep nn.Linear's own (non-zero) init, as in PEFT
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def remove_adapter(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in store:
                del store[name]
        self.scaling.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A * scaling in fp32, the update a merge adds to the base weight."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return result
        lora_a = self.lora_A[name]
        update = self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
        return (result + update * self.scaling[name]).to(result.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapter!r}"


class ModulesToSave(nn.Module):
    """A module trained in full beside LoRA (e.g. a classification head): one copy per adapter, base untouched."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.training = original_module.training

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        return self.modules_to_save[self.active_adapter] if self.active_adapter in self.modules_to_save \
            else self.original_module

    @property
    def weight(self) -> torch.Tensor:
        return self.active_module().weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)


@dataclass
class AdapterSet:
    """The adapters injected into one model; a bias an adapter trains is swapped in and out with it."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: str | None = None
    # keyed by the Parameter itself: its name changes when a later adapter wraps its layer (`x.base_layer.bias`)
    bias_origin: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)  # restored on switch / unload
    bias_values: dict[str, dict[nn.Parameter, torch.Tensor]] = field(default_factory=dict)  # inactive adapters


# -- finding modules ----------------------------------------------------------------------------------------
def task_type_of(model: nn.Module) -> str | None:
    return TASK_TYPES.get(type(model).__name__)


def _matches_peft_rule(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex the whole name must match; a list entry matches the name or its suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear))  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules of the base model, not the LoRA / copy modules injected into it."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLinear, ModulesToSave)):
            skip += [f"{name}.lora_", f"{name}.modules_to_save.", f"{name}.base_layer", f"{name}.original_module"]
        yield name, module


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the Linear modules the config targets; every listed name must match something."""
    linears = [n for n, m in _base_modules(model) if _is_linear(m) and n]
    saved = config.modules_to_save or []
    if config.target_modules == ALL_LINEAR:
        found = [n for n in linears if decoder_layer_index(n) is not None]
    else:
        found = [n for n in linears if _matches_peft_rule(n, config.target_modules)]
        if isinstance(config.target_modules, list):
            unknown = [t for t in config.target_modules if not any(_matches_peft_rule(n, [t]) for n in linears)]
            if unknown:
                raise AdapterError(f"target_modules {unknown} match no Linear module of {type(model).__name__} "
                                   f"(its Linear modules end in {sorted({n.rsplit('.', 1)[-1] for n in linears})})")
    found = [n for n in found if not _matches_peft_rule(n, saved)]
    if not found:
        raise AdapterError(f"target_modules {config.target_modules!r} match no Linear module of "
                           f"{type(model).__name__}")
    return found


def short_target_names(names: list[str]) -> list[str]:
    """`all-linear` is written to adapter_config.json as the short names it resolved to, as PEFT lists them."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_set(model: nn.Module) -> AdapterSet:
    found = getattr(model, "lora_adapters", None)
    if found is None:
        raise AdapterError(f"{type(model).__name__} has no LoRA adapters (call qopt.add_lora first)")
    return found


def bias_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    """The biases an adapter trains and saves, by name: none, all of them, or those of its LoRA layers."""
    if config.bias == "all":
        saved = [f"{n}." for n, _ in saved_modules(model)]
        return {n: p for n, p in model.named_parameters()
                if n.endswith("bias") and ".lora_" not in n and not any(n.startswith(s) for s in saved)}
    if config.bias == "lora_only":
        return {f"{n}.base_layer.bias": m.base_layer.bias for n, m in lora_layers(model)
                if adapter_name in m.lora_A and m.base_layer.bias is not None}
    return {}


# -- adding, switching, removing ----------------------------------------------------------------------------
def add_lora(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default",
             dtype: torch.dtype = torch.float32, initialise: bool = True, activate: bool = True) -> nn.Module:
    """Inject a LoRA adapter in place and make it the only trainable part of the model (PEFT's get_peft_model)."""
    config = copy.deepcopy(config) if config is not None else LoraConfig()
    config.task_type = config.task_type or task_type_of(model)
    if config.task_type == "SEQ_CLS":
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + SEQ_CLS_HEADS))
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
    adapters = getattr(model, "lora_adapters", None) or AdapterSet()
    if adapter_name in adapters.configs:
        raise AdapterError(f"adapter '{adapter_name}' already exists; delete it or choose another name")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise AdapterError(f"adapter name {adapter_name!r}: use letters, digits, '_' and '-' only")
    targets = resolve_target_modules(model, config)
    if config.target_modules == ALL_LINEAR:
        config.target_modules = short_target_names(targets)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace(model, name, module)
        module.add_adapter(adapter_name, config, dtype, initialise)
    for name, module in list(_base_modules(model)):
        if name and config.modules_to_save and _matches_peft_rule(name, config.modules_to_save) \
                and not isinstance(module, LoraLinear) and ".base_layer" not in name:
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace(model, name, module)
            module.add_adapter(adapter_name)
    model.lora_adapters = adapters
    adapters.configs[adapter_name] = config
    for param in bias_parameters(model, config, adapter_name).values():
        adapters.bias_origin.setdefault(param, param.detach().clone())
    set_adapter(model, adapter_name if activate else adapters.active)  # refreshes what is trainable
    return model


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make one adapter active (None = the base model alone); only its weights stay trainable."""
    adapters = adapter_set(model)
    if adapter_name is not None and adapter_name not in adapters.configs:
        raise AdapterError(f"no adapter named '{adapter_name}' (have {sorted(adapters.configs)})")
    if adapter_name != adapters.active:
        _swap_biases(model, adapters, adapter_name)
    adapters.active = adapter_name
    for _, module in list(lora_layers(model)) + list(saved_modules(model)):
        module.active_adapter = adapter_name
    for p in model.parameters():
        p.requires_grad_(False)
    config = adapters.configs.get(adapter_name) if adapter_name is not None else None
    if config is None or config.inference_mode:
        return
    for param in bias_parameters(model, config, adapter_name).values():
        param.requires_grad_(True)
    for _, module in lora_layers(model):
        if adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
    for _, module in saved_modules(model):
        if adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)


def _swap_biases(model: nn.Module, adapters: AdapterSet, new: str | None) -> None:
    old = adapters.active
    if old is not None:
        adapters.bias_values[old] = {p: p.detach().clone()
                                     for p in bias_parameters(model, adapters.configs[old], old).values()}
    with torch.no_grad():
        for param, value in adapters.bias_origin.items():
            param.copy_(value)
        for param, value in adapters.bias_values.get(new, {}).items():
            param.copy_(value)


def set_adapter_biases(model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]) -> None:
    """Give an adapter its trained bias values (by name, from a file), whether it is active or not."""
    adapters = adapter_set(model)
    params = bias_parameters(model, adapters.configs[adapter_name], adapter_name)
    if adapters.active == adapter_name:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
    else:
        adapters.bias_values[adapter_name] = {params[n]: v.detach().clone() for n, v in values.items()}


def adapter_biases(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The bias values an adapter trains, by their current names, whether it is active or not."""
    adapters = adapter_set(model)
    params = bias_parameters(model, adapters.configs[adapter_name], adapter_name)
    if adapters.active == adapter_name:
        return {n: p.detach() for n, p in params.items()}
    stored = adapters.bias_values.get(adapter_name, {})
    return {n: stored.get(p, adapters.bias_origin[p]) for n, p in params.items()}


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (e.g. a reference forward during training)."""
    adapters = adapter_set(model)
    active = adapters.active
    set_adapter(model, None)
    try:
        yield
    finally:
        set_adapter(model, active)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    adapters = adapter_set(model)
    if adapter_name not in adapters.configs:
        raise AdapterError(f"no adapter named '{adapter_name}' (have {sorted(adapters.configs)})")
    if adapters.active == adapter_name:
        set_adapter(model, None)
    for _, module in list(lora_layers(model)) + list(saved_modules(model)):
        module.remove_adapter(adapter_name)
    del adapters.configs[adapter_name]
    adapters.bias_values.pop(adapter_name, None)
    _strip_empty(model)


def _strip_empty(model: nn.Module) -> None:
    """Put the base module back wherever no adapter is left."""
    for name, module in list(lora_layers(model)):
        if not module.lora_A:
            _replace(model, name, module.base_layer)
    for name, module in list(saved_modules(model)):
        if not module.modules_to_save:
            _replace(model, name, module.original_module)
    adapters = getattr(model, "lora_adapters", None)
    if adapters is not None and not adapters.configs:
        del model.lora_adapters


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the base model exactly (biases included)."""
    adapters = adapter_set(model)
    set_adapter(model, None)
    for name in list(adapters.configs):
        delete_adapter(model, name)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they hold, not bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if isinstance(p, bnb.nn.Params4bit) else p.numel()  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
