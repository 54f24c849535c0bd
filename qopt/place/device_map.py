"""Device maps: where each module goes (accelerate's `infer_auto_device_map` on the sizing view), the
`max_memory` it is planned for, and a map read back as one line per device.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from accelerate.utils import find_tied_parameters, get_balanced_memory, get_max_memory, infer_auto_device_map
from torch import nn

from ..errors import PlanError
from ..model.network import decoder_layer_index, is_decoder_layer
from ..utils import parse_size
from .sizes import NO_SPLIT, DeviceMap, sizing_view
from .strategies import STRATEGIES


# -- device maps ----------------------------------------------------------------------------------------------
def normalize_max_memory(max_memory: dict[Any, Any] | None) -> dict[int | str, int]:
    """{0: "24GiB", "cpu": "64GiB"} -> bytes; "gpu" means device 0; None -> what this machine has free."""
    if max_memory is None:
        return get_max_memory()
    memory: dict[int | str, int] = {}
    for key, value in max_memory.items():
        if key == "gpu" or (isinstance(key, str) and key.isdigit()):
            key = 0 if key == "gpu" else int(key)
        elif isinstance(key, str) and key.startswith("cuda:"):
            key = int(key.split(":", 1)[1])
        if not isinstance(key, int) and key not in ("cpu", "disk", "mps"):
            raise PlanError(f"max_memory: unknown device {key!r} (expected GPU indices, 'cpu', 'disk')")
        try:
            memory[key] = parse_size(value)
        except ValueError as err:
            raise PlanError(f"max_memory[{key!r}]: {err}") from None
    return dict(sorted(memory.items(), key=lambda kv: (not isinstance(kv[0], int), str(kv[0]))))


def infer_device_map(model: nn.Module, dtype: torch.dtype, device_map: Any = "auto",
                     max_memory: dict[Any, Any] | None = None, kv_bytes_per_layer: int = 0,
                     activation_bytes: int = 0, cpu_layout: bool = False) -> DeviceMap:
    """Where each module goes: a given dict or single device as is, a strategy name through accelerate.

    Sizes are the quantized ones (`sizing_view`); `activation_bytes` is kept free on every non-disk device.
    """
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, dict):
        return dict(device_map)
    if isinstance(device_map, (int, torch.device)) or device_map not in STRATEGIES:
        return {"": _device_name(device_map)}
    view = sizing_view(model, dtype, kv_bytes_per_layer, cpu_layout)
    memory = normalize_max_memory(max_memory)
    memory = {k: (v if k == "disk" else max(0, v - activation_bytes)) for k, v in memory.items()}
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a planned GPU need not exist on this machine
    try:
        with warnings.catch_warnings():  # accelerate's hint about offload buffers concerns its own hooks
            warnings.simplefilter("ignore", UserWarning)
            if device_map != "sequential" and any(isinstance(k, int) for k in memory):
                memory = get_balanced_memory(view, memory, NO_SPLIT, dtype,
                                             low_zero=device_map == "balanced_low_0")
            placed = infer_auto_device_map(view, memory, NO_SPLIT, dtype=dtype)
    finally:
        quiet.setLevel(level)
    placed = {name: device for name, device in placed.items() if not name.endswith(".kv_cache")}
    return _expand_lists(model, _tie_devices(view, placed))


def host_placement(device_map: DeviceMap, source: str = "device map") -> DeviceMap:
    """The decoder layers a map computes on the CPU, stored there and run on the first GPU instead ("host")."""
    if not any(isinstance(device, int) for device in device_map.values()):
        raise PlanError(f"{source}: stream_from_host runs layers stored in host RAM on a GPU, but the device map "
                        f"places nothing on one ({'; '.join(summarize(device_map))}); use device_map='auto' on a "
                        f"machine with a GPU, or leave stream_from_host off")
    return {name: "host" if device == "cpu" and is_decoder_layer(name) else device
            for name, device in device_map.items()}


def _expand_lists(model: nn.Module, device_map: DeviceMap) -> DeviceMap:
    """A ModuleList is never called itself, so its entry becomes one per element (hooks fire per layer)."""
    expanded: DeviceMap = {}
    for name, device in device_map.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.ModuleList):
            expanded.update({f"{name}.{child}": device for child, _ in module.named_children()})
        else:
            expanded[name] = device
    return expanded


def _tie_devices(model: nn.Module, device_map: DeviceMap) -> DeviceMap:
    """Modules sharing a tied weight (OPT's lm_head and embed_tokens) run where that weight lives."""
    for group in find_tied_parameters(model):
        owners = [name.rsplit(".", 1)[0] for name in group]
        home = device_of(owners[0], device_map)
        for owner in owners[1:]:
            if device_of(owner, device_map) != home:
                device_map[owner] = home
    return device_map


def _device_name(device: Any) -> int | str:
    if isinstance(device, torch.device):
        return device.index if device.type == "cuda" and device.index is not None else device.type
    if isinstance(device, int) or device in ("cpu", "disk", "meta", "mps"):
        return device
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        return int(device.split(":")[1]) if ":" in device else 0
    raise ValueError(f"device_map {device!r}: expected None, a dict, a device, or one of {', '.join(STRATEGIES)}")


def device_of(name: str, device_map: DeviceMap) -> int | str:
    """The device of a module or tensor name: its longest prefix in the map."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise PlanError(f"device map {device_map} gives no device for everything")
        name = name.rsplit(".", 1)[0] if "." in name else ""


def summarize(device_map: DeviceMap) -> list[str]:
    """One line per device, decoder layers as ranges: ["cpu: model.decoder.embed_tokens, layers 0-11", ...]."""
    by_device: dict[str, tuple[list[int], list[str]]] = {}
    for name, device in device_map.items():
        layers, others = by_device.setdefault(str(device), ([], []))
        (layers.append(decoder_layer_index(name)) if is_decoder_layer(name) else others.append(name or "everything"))
    lines = []
    for device, (layers, others) in by_device.items():
        parts = others + ([f"layers {format_ranges(sorted(layers))}"] if layers else [])
        lines.append(f"{device}: {', '.join(parts)}")
    return lines


def format_ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans)


