"""Opt-in NaN/inf detection that names the first module where a non-finite value appeared.

A NaN in the logits says nothing about where it came from; forward hooks on every module catch the first
output (or input) that stops being finite, so the message points at one layer and one dtype. The check costs a
reduction per module output, so it is off unless asked for (`check_finite` / `find_nonfinite`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import NumericsError


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Floating-point tensors inside a module's inputs or outputs (tuples, lists, dicts, HF-style outputs)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.device.type != "meta":
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # qopt's model outputs
        for item in dataclasses.fields(value):
            yield from _float_tensors(getattr(value, item.name))


def _first_nonfinite(value: Any) -> torch.Tensor | None:
    return next((t for t in _float_tensors(value) if not bool(torch.isfinite(t).all())), None)


def _describe(tensor: torch.Tensor) -> str:
    """'inf in float16 (3 of 128 values)' or 'NaN in bfloat16 (...)'."""
    bad = ~torch.isfinite(tensor)
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"{kind} in {dtype} ({int(bad.sum())} of {tensor.numel()} values)"


def _largest(value: Any) -> float:
    return max((float(t.detach().abs().max()) for t in _float_tensors(value) if t.numel()), default=0.0)


def _bad_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False)
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all())]


def _output_message(name: str, module: nn.Module, inputs: Any, output: torch.Tensor) -> str:
    message = f"{name} ({type(module).__name__}) produced {_describe(output)} from finite inputs"
    bad = _bad_parameters(module)
    if bad:
        return f"{message}; its parameter(s) {', '.join(bad)} are not finite (a corrupt or overflowed checkpoint)"
    if not bool(torch.isnan(output).any()):  # an overflow: say how close the inputs were to the range
        dtype, limit = str(output.dtype).removeprefix("torch."), torch.finfo(output.dtype).max
        message += f"; largest |input| {_largest(inputs):.3g}, {dtype} overflows above {limit:.6g}"
        if output.dtype == torch.float16:
            message += ": run in bfloat16 or float32"
    if module._modules:
        message += " (in its own code, after its submodules' finite outputs)"
    return message


@contextmanager
def check_finite(model: nn.Module) -> Iterator[None]:
    """Within the block, any forward of `model` raises NumericsError at the first non-finite value.

    Modules are checked in the order they finish, so the innermost module whose output first holds NaN/inf is
    named. A module whose *input* is non-finite although every earlier module's output was finite means the
    value appeared in its parent's own code (e.g. attention's softmax): the parent is named then.
    """
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}
    parents = {child: module for module in names for child in module.children()}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bad = _first_nonfinite((args, kwargs))
        if bad is not None:
            parent = parents.get(module)
            where = f"inside {names[parent]} ({type(parent).__name__}), before it called" if parent is not None \
                else "in the input of"
            raise NumericsError(f"{_describe(bad)} appeared {where} {names[module]}")

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        bad = _first_nonfinite(output)
        if bad is not None:
            raise NumericsError(_output_message(names[module], module, (args, kwargs), bad))

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def find_nonfinite(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run `model(*args, **kwargs)` once with `check_finite`; returns the output when every value is finite."""
    with check_finite(model):
        return model(*args, **kwargs)
