"""The swap of `nn.Linear` for bitsandbytes modules, their quantized state in and out, and dequantization.

Saved files always use the layout bitsandbytes and transformers write (`qopt.quant.formats`), whatever state a
module is in, so a save after a forward equals a save before it, byte for byte: see `Linear4bit`.
"""
from __future__ import annotations

import copy
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, dequantize_4bit, has_avx512bf16, int8_vectorwise_dequant
from torch import nn

from ..errors import CheckpointError
from ..utils import release_freed_heap
from . import internals, quantizers
from .config import QuantizationConfig
from .formats import BLOCKSIZE, INT8_ROW_FORMAT, SAVED_INT8_KEYS, saved_4bit_keys


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit whose saved form does not depend on the CPU repack.

    The first eval forward on an AVX512-BF16 CPU repacks the weight for the CPU kernel and replaces the absmax
    with a bf16 copy (double-quant statistics dropped); bitsandbytes' own save then re-quantizes them, so its
    files change after a forward. This class keeps the quant state as quantized (`_statistics`, sharing its
    tensors) beside the packed weight, saves from it and undoes the weight's repack exactly, so a save after a
    forward equals a save before it byte for byte. The first eval forward without grad builds the CPU layout with
    qopt's leaner packer (`pack_for_cpu`), where bitsandbytes would repack;
    `train()` and device / dtype moves (`model.to(...)`, which bitsandbytes does not unpack) restore the
    standard layout first.
    """

    _statistics: QuantState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not x.requires_grad and x.device.type == "cpu":
            self.pack_for_cpu()  # where bitsandbytes would repack now, with qopt's leaner packer
        self.remember_statistics()
        state = getattr(self.weight, "quant_state", None)
        bias = self.bias
        if bias is None or not (x.requires_grad and torch.is_grad_enabled()) or not internals.is_cpu_packed(state):
            return super().forward(x)
        # bitsandbytes adds the bias in place to the packed CPU kernel's output, which autograd refuses when the
        # input requires grad (an eval-mode model called without no_grad after an eval forward, e.g. generate);
        # add it out of place, in the compute dtype, as the kernel would (values only: bitsandbytes' packed
        # kernel has no backward)
        self.bias = None
        try:
            out = super().forward(x)
        finally:
            self.bias = bias
        compute = self.compute_dtype or out.dtype
        return (out.to(compute) + bias.to(compute)).to(out.dtype)

    def remember_statistics(self) -> None:
        """Keep the standard quant state (a shallow copy: the repack replaces its fields, not its tensors) while
        the module still holds it."""
        state = getattr(self.weight, "quant_state", None)
        if state is None or internals.is_cpu_packed(state):
            return
        kept = self._statistics
        if kept is None or kept is state or kept.absmax is not state.absmax:
            self._statistics = copy.copy(state)

    def pack_for_cpu(self) -> bool:
        """Build the CPU kernel's layout now, as bitsandbytes' first eval forward on this CPU would; returns
        whether it did (not where bitsandbytes would not repack, e.g. on a GPU or without AVX512-BF16)."""
        state = getattr(self.weight, "quant_state", None)
        if state is None or internals.is_cpu_packed(state) or not self.support_avx512bf16_for_cpu \
                or self.weight.device.type != "cpu" or not internals.SUPPORTED:
            return False
        self.remember_statistics()
        self.weight.data = internals.pack_for_cpu(self.weight.data, state)
        release_freed_heap(internals.packing_temporary_bytes(state))
        return True

    def restore_standard_layout(self) -> None:
        """Undo the CPU repack: the exact standard weight and the statistics as quantized (bitsandbytes' own
        inverse, which re-quantizes the bf16 absmax, only where they were not kept)."""
        state = getattr(self.weight, "quant_state", None)
        if not internals.is_cpu_packed(state):
            return
        weight = internals.unpack_weight(self.weight.data, state)
        if self._statistics is None:
            _, self._statistics = internals.unpack(self.weight.data, state)
        self.weight.data, self.weight.quant_state = weight, self._statistics
        self.quant_state, self._statistics = self._statistics, None
        release_freed_heap(internals.packing_temporary_bytes(self.quant_state))

    def train(self, mode: bool = True) -> Linear4bit:
        if mode:
            self.restore_standard_layout()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        self.restore_standard_layout()  # a packed weight moved to another device would be read wrongly there
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        state = getattr(self.weight, "quant_state", None)
        if not internals.is_cpu_packed(state) or self._statistics is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = internals.unpack_weight(self.weight.data, state)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self._statistics.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value


# -- module-level helpers --------------------------------------------------------------------------------------
def cpu_repacks() -> bool:
    """Whether 4-bit layers computing on this CPU hold the CPU kernel's layout (bitsandbytes repacks them for its
    AVX512-BF16 kernel; qopt builds that layout at the first eval forward)."""
    return internals.SUPPORTED and bool(has_avx512bf16())


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def bits_of(module: nn.Module) -> int:
    """8 for Linear8bitLt, 4 for Linear4bit, 16 for anything else."""
    return 8 if isinstance(module, bnb.nn.Linear8bitLt) else 4 if isinstance(module, bnb.nn.Linear4bit) else 16


def config_of(module: nn.Module) -> QuantizationConfig:
    """The settings a quantized module was built with (to re-quantize a merged weight the same way)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return QuantizationConfig(load_in_8bit=True, llm_int8_threshold=module.state.threshold)
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        return QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type=weight.quant_type,
                                  bnb_4bit_use_double_quant=bool(weight.compress_statistics),
                                  bnb_4bit_compute_dtype=module.compute_dtype or torch.bfloat16,
                                  bnb_4bit_quant_storage=module.quant_storage)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt")


def quantizable_linears(model: nn.Module, config: QuantizationConfig) -> Iterator[tuple[str, nn.Linear, int]]:
    """(name, module, bits) for every plain `nn.Linear` the config quantizes (bits 4 or 8)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            bits = config.bits_for(name)
            if bits != 16:
                yield name, module, bits


def empty_quantized_linear(in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                           bits: int) -> nn.Module:
    """A bitsandbytes module on the meta device, to be filled by `set_quantized_state`."""
    if bits == 8:
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                                     threshold=config.llm_int8_threshold, device="meta")
    else:
        module = Linear4bit(in_features, out_features, bias=bias, compute_dtype=config.bnb_4bit_compute_dtype,
                            compress_statistics=config.bnb_4bit_use_double_quant,
                            quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                            device="meta")
        # the CPU kernel's repack needs whole blocks per row and rows in groups of 32; bitsandbytes would fail
        # on other shapes (e.g. a 32-wide projection), which then take the dequantizing path. On versions qopt was
        # not tested on the repack (a private layout) is left out altogether, so saves stay byte-identical
        module.support_avx512bf16_for_cpu &= in_features % BLOCKSIZE == 0 and out_features % 32 == 0 \
            and internals.SUPPORTED
    return module.requires_grad_(False)


def swap_linears_on_meta(model: nn.Module, config: QuantizationConfig) -> dict[str, int]:
    """Replace each quantizable Linear of a meta model by an empty bitsandbytes module; returns {name: bits}."""
    swapped = {}
    for name, linear, bits in quantizable_linears(model, config):
        model.set_submodule(name, empty_quantized_linear(linear.in_features, linear.out_features,
                                                         linear.bias is not None, config, bits))
        swapped[name] = bits
    return swapped


QUANT_STATE = "quant_state"  # key of a live bitsandbytes QuantState in a module's state (never a saved key)


def quantize_weight(weight: torch.Tensor, config: QuantizationConfig, bits: int, dtype: torch.dtype | None = None
                    ) -> dict[str, Any]:
    """A float weight (cast to `dtype` first, as transformers does) -> its quantized tensors in the standard
    layout (keys relative to the module); a 4-bit weight's statistics stay one `QuantState` under
    `QUANT_STATE`, for `set_quantized_state` to take as it is (`saved_layout` spells them out for a file)."""
    weight = weight.detach()
    if bits == 8:
        codes, scales = quantizers.quantize_int8_rows(weight, dtype)
        return {"weight": codes, "SCB": scales, "weight_format": torch.tensor(INT8_ROW_FORMAT, dtype=torch.uint8)}
    packed, state = quantizers.quantize_4bit(weight, config.bnb_4bit_quant_type, BLOCKSIZE,
                                          config.bnb_4bit_use_double_quant, config.bnb_4bit_quant_storage, dtype)
    return {"weight": packed, QUANT_STATE: state}


def saved_layout(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A module's state as a file holds it: a `QUANT_STATE` entry spelled out as its `weight.*` tensors."""
    tensors = {k: v for k, v in state.items() if k != QUANT_STATE}
    quant_state = state.get(QUANT_STATE)
    if quant_state is not None:
        tensors.update({"weight." + k: v for k, v in quant_state.as_dict(packed=True).items()})
    return tensors


def _quant_state(state: dict[str, Any], device: torch.device | str, where: str) -> QuantState:
    """The 4-bit quant state of a module's state: the live one under `QUANT_STATE`, or read from the saved
    `weight.*` statistics (the file boundary)."""
    live = state.pop(QUANT_STATE, None)
    if live is not None:
        live.to(torch.device(device))  # in place; tensors already there are not copied
        return live
    stats = {k.removeprefix("weight."): v for k, v in state.items()}
    try:
        return QuantState.from_dict(stats, device=torch.device(device))
    except (ValueError, KeyError, AssertionError, TypeError) as err:
        raise CheckpointError(f"{where}: 4-bit statistics are incomplete or malformed (have "
                              f"{sorted(state)}; {err})") from None


def set_quantized_state(module: nn.Module, state: Mapping[str, Any], device: torch.device | str = "cpu",
                        source: str = "") -> nn.Module:
    """Fill a (meta or loaded) bitsandbytes module from standard-layout tensors (or a live 4-bit `QUANT_STATE`),
    without re-quantizing."""
    where = source or type(module).__name__
    state = dict(state)
    bias = state.pop("bias", None)
    if "weight" not in state:
        raise CheckpointError(f"{where}: quantized tensor 'weight' is missing")
    weight = state.pop("weight").to(device)
    if isinstance(module, bnb.nn.Linear8bitLt):
        if "SCB" not in state:
            raise CheckpointError(f"{where}: int8 layer has no 'SCB' (row scales) tensor")
        fmt = state.pop("weight_format", None)
        if fmt is not None and int(fmt.reshape(-1)[0]) != INT8_ROW_FORMAT:
            raise CheckpointError(f"{where}: int8 'weight_format' is {int(fmt.reshape(-1)[0])}, only "
                                  f"{INT8_ROW_FORMAT} (row) "
                                  f"is supported")
        expected = (module.out_features, module.in_features)
        if weight.dtype != torch.int8 or tuple(weight.shape) != expected:
            raise CheckpointError(f"{where}: int8 weight is {weight.dtype} {list(weight.shape)}, expected "
                                  f"torch.int8 {list(expected)}")
        module.state.CB = module.state.SCB = None
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                          SCB=state.pop("SCB").to(device))
    else:
        quant_state = _quant_state(state, device, where)
        expected = (module.out_features, module.in_features)
        nbytes = weight.numel() * weight.element_size()
        if tuple(quant_state.shape) != expected or nbytes != -(-expected[0] * expected[1] // 2):
            raise CheckpointError(f"{where}: 4-bit weight describes shape {list(quant_state.shape)} in {nbytes} "
                                  f"bytes, expected {list(expected)} in {-(-expected[0] * expected[1] // 2)}")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_state=quant_state,
                                          blocksize=quant_state.blocksize, compress_statistics=quant_state.nested,
                                          quant_type=quant_state.quant_type, quant_storage=weight.dtype,
                                          module=module, bnb_quantized=True)
        module.quant_state = quant_state
        if isinstance(module, Linear4bit):
            module._statistics = None
            module.remember_statistics()
    if bias is not None:
        # a 4-bit bias is kept in the compute dtype: bitsandbytes casts it there in place at the first forward,
        # which would otherwise change what a later save writes
        dtype = getattr(module, "compute_dtype", None) or bias.dtype
        module.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return module


def linear_from_quantized(state: Mapping[str, Any], config: QuantizationConfig,
                          device: torch.device | str = "cpu", source: str = "") -> nn.Module:
    """A bitsandbytes Linear from already-quantized tensors in the standard layout (no re-quantization).

    `state` holds `weight` (+ `bias`) and either `SCB` (int8) or the 4-bit statistics (`weight.absmax`,
    `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__<type>`, or a live `QUANT_STATE`
    as `quantize_weight` returns it); the 4-bit quant type
    and double quantization come from the statistics, the compute dtype and int8 threshold from `config`.
    """
    if "SCB" in state:
        out_features, in_features = state["weight"].shape
        module = empty_quantized_linear(in_features, out_features, "bias" in state, config, 8)
    elif QUANT_STATE in state:
        out_features, in_features = state[QUANT_STATE].shape
        module = empty_quantized_linear(in_features, out_features, "bias" in state, config, 4)
    else:
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        try:
            shape = QuantState.from_dict(dict(stats), device=torch.device("cpu")).shape
            out_features, in_features = shape
        except (ValueError, KeyError, AssertionError, TypeError) as err:
            raise CheckpointError(f"{source or 'linear_from_quantized'}: 4-bit statistics are incomplete or "
                                  f"malformed ({err})") from None
        module = empty_quantized_linear(in_features, out_features, "bias" in state, config, 4)
    return set_quantized_state(module, state, device, source)


def quantize_linear(linear: nn.Linear, config: QuantizationConfig, bits: int | None = None) -> nn.Module:
    """One float Linear -> a bitsandbytes module holding its quantized weight (same device, same mode)."""
    state = quantize_weight(linear.weight, config, bits or config.bits)
    if linear.bias is not None:
        state["bias"] = linear.bias.detach()
    return linear_from_quantized(state, config, linear.weight.device).train(linear.training)


def quantize_model(model: nn.Module, config: QuantizationConfig | str) -> nn.Module:
    """Swap every quantizable Linear of an in-memory float model for its bitsandbytes module, in place."""
    config = QuantizationConfig.coerce(config)
    for name, linear, bits in quantizable_linears(model, config):
        model.set_submodule(name, quantize_linear(linear, config, bits))
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_dict()
    return model


def owning_module(key: str, modules: Collection[str]) -> str | None:
    """The module among `modules` a state-dict key belongs to (`...fc1.weight.absmax` -> `...fc1`), if any."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:cut]) in modules:
            return ".".join(parts[:cut])
    return None


def saved_keys(module: nn.Module) -> set[str]:
    """The keys (relative to the module) a quantized module's saved state has, so a loader can name the ones a
    checkpoint lacks; int8's `weight_format` is optional when reading."""
    bias = {"bias"} if module.bias is not None else set()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bias | SAVED_INT8_KEYS
    return bias | saved_4bit_keys(module.weight.quant_type, module.weight.compress_statistics)


def quantized_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """One module's tensors as they are saved (standard layout, keys relative to the module)."""
    state: dict[str, torch.Tensor] = {}
    module._save_to_state_dict(state, "", keep_vars=False)
    return state


def dequantize_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight of a Linear8bitLt / Linear4bit / nn.Linear in any state (CPU-packed or not, double
    quant or not): what the stored bytes mean, computed from the standard layout."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        weight = int8_vectorwise_dequant(module.weight.data, scales)
    elif isinstance(module, bnb.nn.Linear4bit):
        state = quantized_state(module)
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        weight = dequantize_4bit(state["weight"], QuantState.from_dict(stats, device=state["weight"].device))
    else:
        weight = module.weight.detach()
    return weight if dtype is None else weight.to(dtype)


# -- the CPU kernel's layout, for layers rebuilt from disk at every forward -------------------------------------
CPU_PACKED_KEYS = ("weight", "weight.absmax")  # standard keys the CPU layout replaces (statistics: bf16 absmax)
_CPU_LAYOUT_SKIPS = ("weight", "weight.absmax", "weight.nested_absmax", "weight.nested_quant_map")


def cpu_packed_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """A 4-bit module's weight and absmax as bitsandbytes' CPU kernel reads them once its first eval forward has
    repacked it; None when the module is not in that layout (or stores its weight in a type other than uint8).
    Keys are `CPU_PACKED_KEYS`: a layer rebuilt from disk at every forward can keep this form and skip the repack."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if not isinstance(module, bnb.nn.Linear4bit) or state is None or module.quant_storage != torch.uint8 \
            or not internals.is_cpu_packed(state):
        return None
    return {"weight": module.weight.data, "weight.absmax": state.absmax}


def cpu_layout_needs(key: str) -> bool:
    """Whether a 4-bit module's standard saved key (relative to the module) is still read when the module is
    rebuilt from its CPU layout: the quant map, the quant-state record and the bias; not the weight or absmax."""
    return key not in _CPU_LAYOUT_SKIPS


def set_cpu_packed_state(module: nn.Module, packed: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                         nested: bool, source: str = "") -> nn.Module:
    """Fill a (meta) Linear4bit directly in the CPU kernel's layout: `packed` from `cpu_packed_tensors`, `state`
    the module's other standard tensors (`cpu_layout_needs`), `nested` whether its saved statistics are double
    quantized. The module computes exactly as after bitsandbytes' own repack; it holds no standard statistics,
    so its tensors are saved from where they were read instead."""
    where = source or type(module).__name__
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    stats["absmax"] = packed["weight.absmax"]
    try:
        quant_state = QuantState.from_dict(stats, device=packed["weight"].device)
    except (ValueError, KeyError, AssertionError, TypeError) as err:
        raise CheckpointError(f"{where}: 4-bit statistics are incomplete or malformed ({err})") from None
    weight = packed["weight"]
    expected = (module.out_features, module.in_features // 2)
    if tuple(quant_state.shape) != (module.out_features, module.in_features) or tuple(weight.shape) != expected:
        raise CheckpointError(f"{where}: CPU-packed 4-bit weight is {list(weight.shape)}, expected {list(expected)}")
    internals.mark_cpu_packed(quant_state, nested, weight)
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_state=quant_state,
                                      blocksize=quant_state.blocksize, compress_statistics=nested,
                                      quant_type=quant_state.quant_type, quant_storage=torch.uint8, module=module,
                                      bnb_quantized=True)
    module.quant_state = quant_state
    if isinstance(module, Linear4bit):
        module._statistics = None
    bias = state.get("bias")
    if bias is not None:
        module.bias = nn.Parameter(bias.to(weight.device, module.compute_dtype or bias.dtype), requires_grad=False)
    return module
