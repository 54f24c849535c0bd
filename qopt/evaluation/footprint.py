"""What the weights of a loaded model occupy, in either 4-bit state: bytes as stored (quantization statistics
included) and the bits per parameter over the quantized linears and over the whole model.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

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
    """Bytes of weights as they are held now, and the parameter counts the bits are spread over."""

    bytes: int
    params: int
    linear_bytes: int
    linear_params: int
    linear_layers: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def linear_bits_per_param(self) -> float:
        return 8 * self.linear_bytes / self.linear_params if self.linear_params else float("nan")


def weight_footprint(model: nn.Module) -> Footprint:
    """Parameters + buffers as stored, quantized storage counted with its statistics, in either 4-bit state.

    Linear layers are the bitsandbytes ones where the model has any, otherwise every nn.Linear except an
    output head tied to the embedding; their bits exclude biases (which stay 16/32-bit everywhere). Weights
    offloaded to disk (meta tensors here) are not counted: this is what the model holds in memory.
    """
    seen: dict[Any, int] = {}
    total = sum(_storage_bytes(_module_tensors(m), seen) for m in model.modules())
    params = sum(_logical_numel(p) for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    quantized = [m for m in model.modules() if isinstance(m, _bnb_linear_types())]
    if quantized:
        linears = quantized
    else:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings]
    linear_bytes = sum(_storage_bytes(_module_tensors(m, skip=("bias",))) for m in linears)
    linear_params = sum(_logical_numel(m.weight) for m in linears)
    return Footprint(total, params, linear_bytes, linear_params, len(linears))


