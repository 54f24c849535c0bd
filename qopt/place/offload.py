"""Offloaded decoder layers, quantized ones included: on disk, or stored in host RAM and run on the GPU.

accelerate's own disk offload writes a bitsandbytes layer's tensors correctly but cannot put them back (it
rebuilds `Params4bit` around a meta quant state; `Linear8bitLt` assumes a GPU). Here the offload folder holds
each layer's tensors in the standard saved layout (accelerate's `offload_weight` format: one raw `.dat` file per
tensor plus `index.json`, read back by `offload_io.OffloadStore` with counted positional reads), and
`RebuildOnForward`, an accelerate `ModelHook`, rebuilds the layer from them before its forward (quantized
weights through `set_quantized_state`, no re-quantization) and frees it after. A layer-major runner
(`qopt.loading.layer_runner`) instead holds a layer resident while every micro-batch passes through it.

A layer placed "host" is the GPU user's middle ground (FlexGen's and accelerate's CPU offload): its tensors,
quantized, stay in host RAM (`HostStore`, pinned when a GPU is present: page-locked memory copies to a GPU at
full PCIe speed) and the same hook copies them to the main device for its forward, so a GPU computes what a CPU
would otherwise compute; the layer-major runner copies each such layer once per pass.
"""
from __future__ import annotations

import errno
import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import save_offload_index, send_to_device, set_module_tensor_to_device
from torch import nn

from ..errors import PlanError
from ..model.network import is_decoder_layer
from ..quant.modules import (
    CPU_PACKED_KEYS,
    cpu_layout_needs,
    cpu_packed_tensors,
    is_quantized,
    owning_module,
    set_cpu_packed_state,
    set_quantized_state,
)
from ..utils import format_bytes
from .offload_io import OffloadStore, packed_key


class OffloadFolder:
    """Tensors written one by one to an offload folder; `loader()` reads them back lazily."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, dict[str, Any]] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor in accelerate's `offload_weight` layout (raw `.dat` + index entry), but through plain
        file writes: a full disk then raises ENOSPC here, where writing through a memory map (as `offload_weight`
        does) would kill the process with SIGBUS."""
        tensor, dtype = tensor.detach().cpu(), None
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: stored as int16, as accelerate does
            tensor, dtype = tensor.view(torch.int16), "bfloat16"
        elif str(tensor.dtype).startswith("torch.float8_"):
            tensor, dtype = tensor.view(torch.int8), str(tensor.dtype).split(".")[1]
        array = tensor.contiguous().numpy()
        try:
            with open(self.folder / f"{name}.dat", "wb") as file:
                file.write(memoryview(array.reshape(-1)).cast("B"))  # OSError with errno on a short write
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise PlanError(f"offload folder {self.folder.parent}: no space left writing '{name}' "
                            f"({format_bytes(array.nbytes)}; {err.strerror}); free space there, pass another "
                            f"offload_folder= or raise max_memory") from None
        self.index[name] = {"dtype": dtype or str(array.dtype), "shape": list(array.shape)}

    def remove(self) -> None:
        """Delete what was written (a load that failed part-way leaves nothing behind)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def loader(self) -> OffloadStore:
        save_offload_index(self.index, str(self.folder))
        return OffloadStore(self.folder, self.index)


class RebuildOnForward(ModelHook):
    """Materialize a module's offloaded tensors on `device` for one forward, then return them to meta.

    While `resident` is set (a layer-major runner holds the layer for many forwards), forwards only move their
    inputs; the runner calls `materialize` and `release` itself."""

    def __init__(self, prefix: str, weights: Mapping[str, torch.Tensor], device: torch.device | str) -> None:
        self.prefix = prefix
        self.weights = weights
        self.device = device
        self.keys = [k for k in weights if k.startswith(prefix)]
        self.resident = False

    def init_hook(self, module: nn.Module) -> nn.Module:
        quantized = {name for name, m in module.named_modules() if is_quantized(m)}
        self.groups: dict[str, list[str]] = {}  # quantized submodule (relative name) -> its keys
        self.plain: list[str] = []  # other tensors (relative names)
        for key in self.keys:
            relative = key[len(self.prefix):]
            owner = owning_module(relative, quantized)
            (self.groups.setdefault(owner, []).append(relative) if owner is not None else self.plain.append(relative))
        self.nested = {owner: any(k.endswith("nested_absmax") for k in keys) for owner, keys in self.groups.items()}
        return module

    def fetch(self) -> dict[str, torch.Tensor]:
        """The tensors a rebuild reads now (see `OffloadStore.layer_keys`)."""
        if isinstance(self.weights, OffloadStore):
            return self.weights.read_keys(self.weights.layer_keys(self.prefix))
        return {key: self.weights[key] for key in self.keys}

    def materialize(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the module on the execution device from `tensors` (from `fetch` or a prefetcher)."""
        for owner, keys in self.groups.items():
            full = self.prefix + owner
            if packed_key(full, "weight") in tensors:
                state = {k[len(owner) + 1:]: tensors[self.prefix + k] for k in keys
                         if cpu_layout_needs(k[len(owner) + 1:])}
                packed = {k: tensors[packed_key(full, k)].to(self.device) for k in CPU_PACKED_KEYS}
                set_cpu_packed_state(module.get_submodule(owner), packed, state, self.nested[owner],
                                     source=f"offloaded {full}")
                continue
            state = {k[len(owner) + 1:]: tensors[self.prefix + k] for k in keys}
            set_quantized_state(module.get_submodule(owner), state, self.device, source=f"offloaded {full}")
        for name in self.plain:  # in their stored dtype: the meta placeholders are float32 whatever was loaded
            value = tensors[self.prefix + name]
            set_module_tensor_to_device(module, name, self.device, value=value, dtype=value.dtype)

    def release(self, module: nn.Module) -> None:
        """Back to meta; a 4-bit module the CPU kernel repacked leaves that layout in the store for next time."""
        for owner in self.groups:
            submodule = module.get_submodule(owner)
            packed = cpu_packed_tensors(submodule) if isinstance(self.weights, OffloadStore) else None
            if packed is not None:
                self.weights.put_packed(self.prefix + owner, packed)
            _release(submodule)
        for name in self.plain:
            set_module_tensor_to_device(module, name, "meta")

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if not self.resident:
            self.materialize(module, self.fetch())
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if not self.resident:
            self.release(module)
        return output


def _release(module: nn.Module) -> None:
    """Drop a rebuilt bitsandbytes module's tensors (back to meta placeholders)."""
    for name, param in list(module._parameters.items()):
        if param is not None:
            module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                    requires_grad=False)
    if hasattr(module, "quant_state"):
        module.quant_state = None
        module._statistics = None
    if hasattr(module, "state"):  # Linear8bitLt keeps its int8 codes and scales here after a forward
        module.state.CB = module.state.SCB = None


class HostStore(dict):
    """Tensors of the layers placed "host", in host RAM: pinned when a GPU is present (faster copies to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pin = torch.cuda.is_available()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self[name] = tensor.pin_memory() if self.pin else tensor


OFFLOAD_KINDS = ("disk", "host")  # device-map values of layers rebuilt on the main device for each forward


def attach_disk_hooks(model: nn.Module, device_map: Mapping[str, Any], weights: OffloadStore,
                      execution_device: torch.device | str) -> None:
    """A `RebuildOnForward` on every module the map sends to disk."""
    _attach(model, device_map, "disk", weights, execution_device)
    model._qopt_offloaded = weights
    weakref.finalize(model, shutil.rmtree, weights.save_folder, True)  # the folder lives as long as the model


def attach_host_hooks(model: nn.Module, device_map: Mapping[str, Any], weights: HostStore,
                      execution_device: torch.device | str) -> None:
    """A `RebuildOnForward` on every module the map stores in host RAM, run on `execution_device`."""
    _attach(model, device_map, "host", weights, execution_device)
    model._qopt_host = weights


def _attach(model: nn.Module, device_map: Mapping[str, Any], kind: str, weights: Mapping[str, torch.Tensor],
            execution_device: torch.device | str) -> None:
    check_offloadable(device_map)
    for name, device in device_map.items():
        if device == kind:
            add_hook_to_module(model.get_submodule(name), RebuildOnForward(name + ".", weights, execution_device))


def check_offloadable(device_map: Mapping[str, Any]) -> None:
    """Only decoder layers may be offloaded (disk or host): embeddings, head and final norm are shared or tied."""
    for name, device in device_map.items():
        if device in OFFLOAD_KINDS and not (is_decoder_layer(name) or name.endswith("decoder.layers")):
            where = "to disk" if device == "disk" else "to host RAM (\"host\")"
            raise PlanError(f"device map sends {name or 'the whole model'} {where}; only decoder layers can be "
                            f"offloaded (give the CPU or GPU room for the embeddings, head and final norm)")


def offload_hooks(model: nn.Module) -> dict[str, RebuildOnForward]:
    """Module name -> the hook that rebuilds it (disk and host layers)."""
    return {name: module._hf_hook for name, module in model.named_modules()
            if isinstance(getattr(module, "_hf_hook", None), RebuildOnForward)}


def offloaded_tensors(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The offloaded tensors of a model loaded with disk offload (empty mapping otherwise)."""
    return getattr(model, "_qopt_offloaded", {})
