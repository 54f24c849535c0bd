"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, read, checked, written.

Keys are PEFT's (`base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight`, a saved head as
`base_model.model.score.weight`): no adapter name inside, so one file loads under any name, here or in PEFT.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import AdapterError
from ..io.atomic import atomic_write_text, publish_folder, staging_folder
from ..io.checkpoint import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BIN_INDEX,
    BIN_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    write_safetensors_shards,
)
from ..io.hub import is_hub_id, model_name
from .lora import (
    ALL_LINEAR,
    LoraConfig,
    ModulesToSave,
    adapter_biases,
    adapter_set,
    add_lora,
    bias_parameters,
    delete_adapter,
    lora_layers,
    set_adapter_biases,
    task_type_of,
)

logger = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
# PEFT 0.21.2 LoraConfig fields for features qopt does not implement: written at their defaults, and a file
# that sets one of them is refused rather than silently loaded as something else.
_UNSUPPORTED = {"alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "exclude_modules": None,
                "fan_in_fan_out": False, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
                "layers_to_transform": None, "lora_bias": False, "megatron_config": None, "monteclora_config": None,
                "rank_pattern": {}, "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
                "use_dora": False, "use_qalora": False, "velora_config": None}
# Fields that only steer PEFT's initialisation or bookkeeping: written at PEFT's defaults, ignored on read.
_INERT = {"auto_mapping": None, "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
          "loftq_config": {}, "lora_ga_config": None, "megatron_core": "megatron.core", "qalora_group_size": 16,
          "revision": None}
_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora",
           "init_lora_weights", "task_type", "base_model_name_or_path", "inference_mode")


# -- adapter_config.json ------------------------------------------------------------------------------------
def config_to_dict(config: LoraConfig, inference_mode: bool = True) -> dict[str, Any]:
    """The JSON PEFT writes; `inference_mode` is true in saved files, as PEFT's save_pretrained sets it."""
    data: dict[str, Any] = {**_UNSUPPORTED, **_INERT, "peft_type": "LORA", "peft_version": PEFT_VERSION}
    data.update({name: getattr(config, name) for name in _FIELDS})
    if isinstance(config.target_modules, list):
        data["target_modules"] = sorted(config.target_modules)
    data["inference_mode"] = inference_mode
    return dict(sorted(data.items()))


def config_from_dict(data: Any, source: str) -> LoraConfig:
    if not isinstance(data, dict):
        raise AdapterError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: field 'peft_type' is {data.get('peft_type')!r}, expected 'LORA' "
                           f"(qopt loads LoRA adapters only)")
    used = sorted(k for k in _UNSUPPORTED if data.get(k) not in (None, False, {}, [], ""))
    if used:
        raise AdapterError(f"{source}: uses PEFT feature(s) qopt does not implement: "
                           + ", ".join(f"{k}={data[k]!r}" for k in used))
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in data:
            raise AdapterError(f"{source}: field '{name}' is missing")
    target = data["target_modules"]
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        target = ALL_LINEAR
    kwargs = {name: data[name] for name in _FIELDS if name in data and data[name] is not None}
    kwargs["target_modules"] = target
    try:
        return LoraConfig(**kwargs)
    except AdapterError as err:
        raise AdapterError(f"{source}: {err}") from None


def read_adapter_config(folder: str | os.PathLike) -> LoraConfig:
    file = Path(folder) / ADAPTER_CONFIG
    if not file.exists():
        raise AdapterError(f"{file}: missing; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file}: not valid JSON ({err})") from None
    return config_from_dict(data, str(file))


def read_adapter_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The file's tensors with PEFT's `base_model.model.` prefix removed, and the file they came from."""
    folder = Path(folder)
    file = folder / ADAPTER_WEIGHTS
    try:
        if file.exists():
            state = load_file(str(file))
        elif (folder / ADAPTER_BIN).exists():
            file = folder / ADAPTER_BIN
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"{folder}: no adapter weights (expected {ADAPTER_WEIGHTS} or {ADAPTER_BIN})")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"{file}: unreadable ({err})") from None
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}, file


# -- the model's adapter tensors under PEFT's names ---------------------------------------------------------
def _adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """PEFT key (without `base_model.model.`) -> this model's LoRA / saved-module parameter."""
    found: dict[str, nn.Parameter] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            found[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            found[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, param in module.modules_to_save[adapter_name].named_parameters():
                found[f"{name}.{key}"] = param
    return found


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for this adapter, with PEFT's key names."""
    adapters = adapter_set(model)
    name = adapter_name or adapters.active
    if name not in adapters.configs:
        raise AdapterError(f"no adapter named {name!r} (have {sorted(adapters.configs)})")
    state = {k: p.detach() for k, p in _adapter_parameters(model, name).items()}
    state.update(adapter_biases(model, name))
    return {PEFT_PREFIX + k: v for k, v in state.items()}


def load_adapter_state_dict(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor],
                            source: str) -> None:
    """Copy a file's tensors (keys without the prefix) into an injected adapter: every key, every shape checked."""
    params = _adapter_parameters(model, adapter_name)
    biases = bias_parameters(model, adapter_set(model).configs[adapter_name], adapter_name)
    unexpected = sorted(set(state) - set(params) - set(biases))
    if unexpected:
        raise AdapterError(f"{source}: tensor(s) {unexpected[:3]} name modules this model's adapter does not have "
                           f"(a different base model, or target modules / modules_to_save not in the config)")
    missing = sorted(set(params) - set(state))
    if missing:
        raise AdapterError(f"{source}: tensor(s) {missing[:3]} missing{' and more' if len(missing) > 3 else ''}")
    for key, param in {**params, **biases}.items():
        if key in state and tuple(state[key].shape) != tuple(param.shape):
            raise AdapterError(f"{source}: tensor '{PEFT_PREFIX}{key}' has shape {list(state[key].shape)}, the "
                               f"base model needs {list(param.shape)}: the adapter was made for a different base")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])
    set_adapter_biases(model, adapter_name, {k: v for k, v in state.items() if k in biases})


# -- folders ------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write one adapter as PEFT does, atomically (a kill leaves the old folder or the new one, never a mix)."""
    adapters = adapter_set(model)
    name = adapter_name or adapters.active
    state = adapter_state_dict(model, name)
    folder = Path(folder)
    refuse_model_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(folder)
    write_adapter_files(tmp, adapters.configs[name], state)
    publish_folder(tmp, folder)


def refuse_model_folder(folder: Path) -> None:
    """An adapter never goes into a model folder: the save would replace the model's weights, and loaders that
    find an adapter beside a model read it too (vLLM's bitsandbytes loader, transformers)."""
    weights = next((n for n in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX) if (folder / n).exists()), None)
    if weights and (folder / "config.json").is_file():
        raise AdapterError(f"{folder}: holds a model (config.json + {weights}); save the adapter to its own folder")


def write_adapter_files(folder: Path, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """The two files of an adapter into an existing folder (a staging folder of the caller's)."""
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config_to_dict(config), indent=2) + "\n")
    write_safetensors_shards(state, folder, max_shard_size=2**62, prefix=ADAPTER_WEIGHTS.removesuffix(".safetensors"))


def _base_name(name_or_path: str) -> str:
    """The last part of a base model's name: a Hub id, a local folder and the HF cache's snapshot folder of the
    same repo (…/models--facebook--opt-125m/snapshots/<commit>) all give "opt-125m"."""
    return Path(model_name(str(name_or_path)).rstrip("/")).name.lower()


def _hub_identity(name: str) -> tuple[str | None, str | None]:
    """(repo id, commit) of a base named by a Hub id (`org/name`) or by a snapshot folder of the HF cache;
    (None, None) for a plain folder, which says nothing about the weights once it is copied or moved."""
    parts = Path(name).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return model_name(name).lower(), parts[-1]
    return (name.lower(), None) if "/" in name and is_hub_id(name) else (None, None)


def _hub_difference(ours: str, theirs: str, revision: str | None) -> str | None:
    """Another Hub model or another commit, where both sides name one."""
    (our_repo, our_commit), (their_repo, their_commit) = _hub_identity(ours), _hub_identity(theirs)
    their_commit = their_commit or revision
    if our_repo and their_repo:
        if our_repo != their_repo:
            return f"another Hub model ({their_repo}, this model is {our_repo})"
        if our_commit and their_commit and our_commit != their_commit:
            return f"another revision of {our_repo} ({their_commit}, this model is {our_commit})"
    return None


def _in_out(module: nn.Module) -> tuple[int | None, int | None]:
    base = getattr(module, "base_layer", module)  # a module that already carries another adapter
    return getattr(base, "in_features", None), getattr(base, "out_features", None)


def base_difference(model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor],
                    revision: str | None = None) -> str | None:
    """What makes `model` another base than the adapter's, judged as PEFT does (the target modules exist and
    every LoRA tensor fits its module) plus the Hub id and revision where both sides name one; None if it fits.
    A same-shape base with other weights fits, as in PEFT: only a Hub id or commit can tell those apart."""
    ours, theirs = str(getattr(model, "name_or_path", "") or ""), str(config.base_model_name_or_path or "")
    hub = _hub_difference(ours, theirs, revision)
    if hub:
        return hub
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if isinstance(config.target_modules, list):
        absent = [t for t in config.target_modules if t not in leaves]
        if absent:
            return f"target module {absent[0]!r} is not in this model"
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for key, tensor in sorted(state.items()):
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) or tensor.dim() != 2:
            continue
        name = key.rsplit(".", 2)[0]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return f"{name} is not in this model ({layers} decoder layers)" if layers else f"{name} is not in it"
        inputs, outputs = _in_out(module)
        if key.endswith("lora_A.weight") and inputs is not None and tensor.shape[1] != inputs:
            return f"{name} takes {tensor.shape[1]} inputs in the adapter's base, {inputs} in this model"
        if key.endswith("lora_B.weight") and outputs is not None and tensor.shape[0] != outputs:
            return f"{name} gives {tensor.shape[0]} outputs in the adapter's base, {outputs} in this model"
    return None


_NOTICED: set[tuple[str, str, str]] = set()  # one notice per adapter and base in a process (merge loads twice)


def _check_task(model: nn.Module, config: LoraConfig, source: str) -> None:
    task = task_type_of(model)
    if config.task_type and task and config.task_type != task:
        raise AdapterError(f"{source}: task_type is {config.task_type!r} but the model is "
                           f"{type(model).__name__} ({task})")


def _check_base(model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], source: str,
                revision: str | None) -> str | None:
    """Refuse an adapter whose recorded base differs from this model in what matters (`base_difference`); a
    base that differs by name or path only (a folder copied, renamed or moved) is accepted, and the notice
    to print once the adapter is in is returned."""
    _check_task(model, config, source)
    ours, theirs = getattr(model, "name_or_path", None), config.base_model_name_or_path
    if not ours or not theirs:
        return None
    if _base_name(ours) == _base_name(theirs):  # the same name: only a Hub commit can still tell them apart
        difference = _hub_difference(str(ours), str(theirs), revision)
        if difference:
            raise AdapterError(f"{source}: made for base model {theirs!r}, this model {ours!r} differs: "
                               f"{difference} (pass check_base=False to apply it anyway)")
        return None
    difference = base_difference(model, config, state, revision)
    if difference:
        raise AdapterError(f"{source}: made for base model {theirs!r}, this model {ours!r} differs: {difference} "
                           f"(pass check_base=False to apply it anyway)")
    key = (source, str(theirs), str(ours))
    if key in _NOTICED:
        return None
    _NOTICED.add(key)
    return (f"note: adapter {Path(source).parent} was made for base model {theirs!r}; applying it to {ours!r} "
            f"(same shape and target modules)")


def _recorded_revision(folder: Path) -> str | None:
    """PEFT's own `revision` field of adapter_config.json (the base model's revision), where it names one."""
    try:
        value = json.loads((folder / ADAPTER_CONFIG).read_text()).get("revision")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, dtype: torch.dtype = torch.float32, activate: bool = True,
                 check_base: bool = True) -> LoraConfig:
    """Inject and fill an adapter from a PEFT-format folder (made by qopt or by PEFT); returns its config.

    With `check_base`, an adapter recorded for another base by name is applied when this model has its shape
    and target modules (and the same Hub id and revision where both name one), with a logged notice; it is
    refused, naming the difference, otherwise. Nothing is left behind on failure: a mismatch found after
    injection removes the half-made adapter.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    source = str(folder / ADAPTER_CONFIG)
    state, file = read_adapter_weights(folder)
    notice = _check_base(model, config, state, source, _recorded_revision(folder)) if check_base else None
    config.inference_mode = not is_trainable
    try:
        add_lora(model, config, adapter_name, dtype=dtype, initialise=False, activate=activate)
    except AdapterError as err:
        raise AdapterError(f"{source}: {err}") from None
    try:
        load_adapter_state_dict(model, adapter_name, state, str(file))
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    if notice:
        logger.warning(notice)
    return adapter_set(model).configs[adapter_name]
