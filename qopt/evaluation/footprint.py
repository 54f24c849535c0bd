"""What the weights of a loaded model occupy, in either 4-bit state: bytes as stored (quantization statistics
included) wherever they live (GPU, CPU, host RAM, the offload folder on disk), what of it sits in RAM, and the
bits per parameter over the quantized linears and over the whole model.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from ..place.offload import offloaded_tensors
from ..quant.internals import onednn_nbytes


# -- weight memory -------------------------------------------------------------------------------------------
def _bnb_linear_types() -> tuple[type, ...]:
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def _walk(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a module attribute: quant states, int8 states, containers; never other modules.

    Generic on purpose: whatever a quantized layer keeps beside its weight (bitsandbytes' absmax and nested
    statistics, the original statistics kept across the CPU repack, the int8 row scales, an output head's packed
    copy kept for decoding) is memory it holds.
    """
    if depth > 8 or obj is None or isinstance(obj, nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        for name, value in vars(obj).items():  # Params4bit.quant_state, Int8Params.CB / SCB, ...
            if name != "module":
                yield from _walk(value, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value, depth + 1)
    elif type(obj).__name__ == "QuantState":
        yield from _walk(vars(obj), depth + 1)
    elif type(obj).__name__ == "MatmulLtState":  # only the weights: idx / outlier pool describe activations
        yield from _walk([obj.CB, obj.SCB], depth + 1)


def _module_tensors(module: nn.Module, skip: tuple[str, ...] = ()) -> Iterator[torch.Tensor]:
    for name, value in vars(module).items():
        if name == "_modules" or name in skip:
            continue
        if name in ("_parameters", "_buffers"):
            value = {k: v for k, v in value.items() if k not in skip}
        yield from _walk(value)


def _storage_bytes(tensors: Iterator[torch.Tensor], seen: dict[Any, int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights and int8 CB/weight aliases count once)."""
    seen = {} if seen is None else seen
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        if t.is_mkldnn:  # oneDNN's opaque layout (a packed output head) has no storage to ask
            key, nbytes = ("onednn", id(t)), onednn_nbytes(t)
        else:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in seen:
            continue
        seen[key] = nbytes
        total += nbytes
    return total


def _logical_numel(param: torch.Tensor) -> int:
    """Elements of the original weight: a 4-bit Params4bit stores two per byte, its quant_state knows."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and state.shape is not None else param.numel()


@dataclass(frozen=True)
class Footprint:
    """Bytes of weights wherever they are held now, and the parameter counts the bits are spread over.
    `ram_bytes` is the share in CPU RAM (CPU tensors and host-stored layers), `where` the bytes per place
    ("cpu", "cuda:0", "host", "disk")."""

    bytes: int
    params: int
    linear_bytes: int
    linear_params: int
    linear_layers: int
    ram_bytes: int = 0
    where: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def linear_bits_per_param(self) -> float:
        return 8 * self.linear_bytes / self.linear_params if self.linear_params else float("nan")


def _places(tensors: Iterator[torch.Tensor], seen: dict[Any, int], where: dict[str, int]) -> None:
    """Add each distinct storage's bytes to its device's total in `where`."""
    for t in tensors:
        before = len(seen)
        nbytes = _storage_bytes(iter([t]), seen)
        if len(seen) > before:
            where[str(t.device)] = where.get(str(t.device), 0) + nbytes


def _offloaded(model: nn.Module, linear_names: set[str]) -> tuple[dict[str, int], int]:
    """Bytes of the tensors of offloaded layers, which the model holds as meta tensors: ({"disk": n, "host": n},
    the share of the quantized / plain linears' weights and statistics, biases excluded)."""
    places: dict[str, int] = {}
    linear = 0
    disk = offloaded_tensors(model)
    entries: list[tuple[str, str, int]] = []
    for key in getattr(disk, "index", {}):
        if key.endswith(".weight_format"):  # a serialization flag of int8 layers, not held by a loaded one
            continue
        info = disk.index[key]  # the standard layout (the folder's CPU-layout copies are a rebuild cache)
        itemsize = getattr(torch, str(info["dtype"]).removeprefix("torch."), torch.uint8).itemsize
        entries.append(("disk", key, math.prod(info["shape"]) * itemsize))
    for key, tensor in getattr(model, "_qopt_host", {}).items():
        entries.append(("host", key, tensor.numel() * tensor.element_size()))
    for place, key, nbytes in entries:
        places[place] = places.get(place, 0) + nbytes
        owner = next((n for n in linear_names if key.startswith(n + ".")), None)
        if owner is not None and not key[len(owner) + 1:].startswith("bias"):
            linear += nbytes
    return places, linear


def weight_footprint(model: nn.Module) -> Footprint:
    """Parameters + buffers as stored, quantized storage counted with its statistics, in either 4-bit state.

    Linear layers are the bitsandbytes ones where the model has any, otherwise every nn.Linear except an
    output head tied to the embedding; their bits exclude biases (which stay 16/32-bit everywhere). Layers
    offloaded to disk or host RAM (meta tensors in the model) count with the bytes their store holds, so an
    offloaded model reports what the in-memory one does; `ram_bytes` says how much of it sits in RAM.
    """
    seen: dict[Any, int] = {}
    where: dict[str, int] = {}
    for m in model.modules():
        _places(_module_tensors(m), seen, where)
    quantized = [m for m in model.modules() if isinstance(m, _bnb_linear_types())]
    # a quantized weight's elements from its layer's shape: an offloaded layer between forwards holds a meta
    # tensor of the packed shape without its quant_state
    logical = {id(m.weight): m.in_features * m.out_features for m in quantized}
    params = sum(logical.get(id(p)) or _logical_numel(p) for p in model.parameters()) + \
        sum(b.numel() for b in model.buffers())
    if quantized:
        linears = quantized
    else:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings]
    linear_bytes = sum(_storage_bytes(_module_tensors(m, skip=("bias",))) for m in linears)
    linear_params = sum(logical.get(id(m.weight)) or _logical_numel(m.weight) for m in linears)
    ids = {id(m) for m in linears}
    offloaded, offloaded_linear = _offloaded(model, {n for n, m in model.named_modules() if id(m) in ids})
    for place, nbytes in offloaded.items():
        where[place] = where.get(place, 0) + nbytes
    ram = where.get("cpu", 0) + where.get("host", 0)
    return Footprint(sum(where.values()), params, linear_bytes + offloaded_linear, linear_params, len(linears), ram,
                     where)
