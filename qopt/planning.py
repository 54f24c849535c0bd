"""Memory sizes and the device map (accelerate), and the memory plan behind `qopt plan`.

The loader and `plan()` share `infer_device_map`: accelerate's `infer_auto_device_map` runs on a sizing view
of the meta model in which every quantized Linear is a placeholder holding exactly its quantized bytes
(weight plus statistics), so accelerate sees the real sizes without a weight being read. `plan()` also puts
each decoder layer's KV cache into that layer's placeholder and reserves activation memory on every device,
so its device map keeps room for generation.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes, find_tied_parameters, get_balanced_memory, infer_auto_device_map
from accelerate.utils.modeling import convert_file_size_to_int
from torch import nn

from .bundled import data_dir
from .config import OPTConfig
from .errors import ConfigError, PlanError
from .quantization import BLOCKSIZE, QuantizationConfig, bits_of, is_quantized, swap_linears_on_meta

NO_SPLIT = ["OPTDecoderLayer"]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_NESTED_BLOCKSIZE = 256
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
DeviceMap = dict[str, "int | str"]


# -- sizes ----------------------------------------------------------------------------------------------------
def quantized_weight_bytes(out_features: int, in_features: int, bits: int, double_quant: bool = False) -> int:
    """Bytes of a quantized weight and its statistics, as the loaded bitsandbytes module holds them."""
    n = out_features * in_features
    if bits == 8:
        return n + 4 * out_features  # int8 codes + fp32 row scales (SCB)
    blocks = math.ceil(n / BLOCKSIZE)
    stats = 16 * 4  # the 16-entry fp32 code book
    if double_quant:  # uint8 absmax + fp32 nested absmax, 256-entry nested code book, fp32 offset
        stats += blocks + 4 * math.ceil(blocks / _NESTED_BLOCKSIZE) + 256 * 4 + 4
    else:
        stats += 4 * blocks
    return math.ceil(n / 2) + stats


def _module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """A quantized Linear's bytes: weight and statistics, plus its bias (4-bit biases live in the compute dtype)."""
    bits = bits_of(module)
    double = bits == 4 and bool(module.weight.compress_statistics)
    size = quantized_weight_bytes(module.out_features, module.in_features, bits, double)
    if module.bias is not None:
        bias_dtype = getattr(module, "compute_dtype", None) or dtype
        size += module.out_features * torch.empty(0, dtype=bias_dtype).element_size()
    return size


class _Bytes(nn.Module):
    """Stands for a quantized layer (or a KV cache) in the sizing view: one meta tensor of its exact byte size."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("nbytes", torch.empty(nbytes, dtype=torch.uint8, device="meta"))


def sizing_view(model: nn.Module, dtype: torch.dtype, kv_bytes_per_layer: int = 0) -> nn.Module:
    """A meta copy of `model` whose quantized Linears (and KV caches) are exact-size placeholders."""
    stand_ins = {id(m): _Bytes(_module_bytes(m, dtype)) for m in model.modules() if is_quantized(m)}
    view = copy.deepcopy(model, memo=stand_ins)  # deepcopy takes what the memo already holds for those ids
    if kv_bytes_per_layer:
        for module in view.modules():
            if type(module).__name__ in NO_SPLIT:
                module.add_module("kv_cache", _Bytes(kv_bytes_per_layer))
    return view


def format_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB": sizes in messages, in the unit that keeps them readable."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def placed_bytes(model: nn.Module, dtype: torch.dtype, device_map: DeviceMap, device: int | str) -> int:
    """Bytes of the weights `device_map` puts on `device` (quantized sizes), e.g. what disk offload will write."""
    from accelerate.utils import compute_module_sizes

    names = [name for name, placed in device_map.items() if placed == device]
    if not names:
        return 0
    sizes = compute_module_sizes(sizing_view(model, dtype), dtype=dtype)
    return sum(sizes[name] for name in names)


# -- device maps ----------------------------------------------------------------------------------------------
def normalize_max_memory(max_memory: dict[Any, Any] | None) -> dict[int | str, int]:
    """{0: "24GiB", "cpu": "64GiB"} -> bytes; "gpu" means device 0; None -> what this machine has free."""
    if max_memory is None:
        from accelerate.utils import get_max_memory

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
            memory[key] = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
        except ValueError:
            raise PlanError(f"max_memory[{key!r}] = {value!r}: expected bytes or a size such as 24GiB") from None
    return dict(sorted(memory.items(), key=lambda kv: (not isinstance(kv[0], int), str(kv[0]))))


def infer_device_map(model: nn.Module, dtype: torch.dtype, device_map: Any = "auto",
                     max_memory: dict[Any, Any] | None = None, kv_bytes_per_layer: int = 0,
                     activation_bytes: int = 0) -> DeviceMap:
    """Where each module goes: a given dict or single device as is, a strategy name through accelerate.

    Sizes are the quantized ones (`sizing_view`); `activation_bytes` is kept free on every non-disk device.
    """
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, dict):
        return dict(device_map)
    if isinstance(device_map, (int, torch.device)) or device_map not in STRATEGIES:
        return {"": _device_name(device_map)}
    view = sizing_view(model, dtype, kv_bytes_per_layer)
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
        match = _LAYER.search(name)
        (layers.append(int(match.group(1))) if match else others.append(name or "everything"))
    lines = []
    for device, (layers, others) in by_device.items():
        parts = others + ([f"layers {_ranges(sorted(layers))}"] if layers else [])
        lines.append(f"{device}: {', '.join(parts)}")
    return lines


def _ranges(numbers: list[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans)


# -- configs by name ------------------------------------------------------------------------------------------
def config_for(source: OPTConfig | str | os.PathLike) -> tuple[OPTConfig, str]:
    """(config, label) from an OPTConfig, a checkpoint folder / config.json, or a size name like "opt-30b"."""
    if isinstance(source, OPTConfig):
        return source, "config"
    path = Path(source)
    if path.exists():
        return OPTConfig.from_pretrained(path), str(path)
    key = "opt-" + str(source).lower().removeprefix("facebook/").removeprefix("opt-").removeprefix("opt")
    folder = data_dir() / "configs"
    if (folder / f"{key}.json").exists():
        return OPTConfig.from_pretrained(folder / f"{key}.json"), key
    shapes = json.loads((folder / "paper_shapes.json").read_text())
    if key in shapes:
        base = json.loads((folder / "opt-1.3b.json").read_text())
        base.update(shapes[key], word_embed_proj_dim=shapes[key]["hidden_size"], _name_or_path=f"facebook/{key}")
        return OPTConfig.from_dict(base, source=key), key
    known = sorted({p.stem for p in folder.glob("opt-*.json")} | {k for k in shapes if not k.startswith("_")},
                   key=lambda k: float(k[4:-1]) * (1000 if k.endswith("b") else 1))
    raise ConfigError(f"{source}: not a checkpoint folder, a config.json or a known size ({', '.join(known)})")


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Where an OPT model's weights, KV cache and activations go, computed before any weight is read.

    Byte counts are per device name ("0", "cpu", "disk"); `limits` are the `max_memory` the plan was made for.
    """

    label: str
    quantization: str  # "nf4", "int8", ... or "16-bit"
    dtype: torch.dtype
    context: int
    batch: int
    device_map: DeviceMap
    limits: dict[str, int]  # in placement order: GPUs first, then "cpu"
    weight_bytes: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)  # disk layers' caches live on the main device
    activation_bytes: int = 0  # on each device that runs layers
    parameters: int = 0

    @property
    def main_device(self) -> str:
        return next(iter(self.limits))

    def used_bytes(self, device: str) -> int:
        runs = device != "disk" and (device in self.kv_cache_bytes or device in self.weight_bytes)
        return self.weight_bytes.get(device, 0) + self.kv_cache_bytes.get(device, 0) + \
            (self.activation_bytes if runs else 0)

    @property
    def fits(self) -> bool:
        """Whole model, KV cache and activations on the first (fastest) device of `max_memory`."""
        main = self.main_device
        return set(map(str, self.device_map.values())) == {main} and self.used_bytes(main) <= self.limits[main]

    def format(self) -> str:
        gb = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        count = f"{self.parameters / 1e9:.2f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.1f}M"
        lines = [f"{self.label}: {count} parameters, {self.quantization} "
                 f"(other tensors {str(self.dtype).removeprefix('torch.')}), context {self.context}, "
                 f"batch {self.batch}",
                 f"weights {gb(sum(self.weight_bytes.values()))}, KV cache {gb(sum(self.kv_cache_bytes.values()))}, "
                 f"activations {gb(self.activation_bytes)} per device (estimate)",
                 f"{'device':8s} {'limit':>12s} {'weights':>12s} {'KV cache':>12s} {'activations':>12s} "
                 f"{'total':>12s}"]
        for dev in [*self.limits, "disk"]:
            if dev in self.weight_bytes or dev in self.kv_cache_bytes:
                act = self.activation_bytes if dev != "disk" else 0
                limit = gb(self.limits[dev]) if dev in self.limits else "-"
                lines.append(f"{dev:8s} {limit:>12s} {gb(self.weight_bytes.get(dev, 0)):>12s} "
                             f"{gb(self.kv_cache_bytes.get(dev, 0)):>12s} {gb(act):>12s} "
                             f"{gb(self.used_bytes(dev)):>12s}")
        lines.append("device map: " + "; ".join(summarize(self.device_map)))
        main = self.main_device
        name = f"GPU {main}" if main.isdigit() else main
        lines.append(f"fits on {name} ({gb(self.limits[main])}): {'yes' if self.fits else 'no'}")
        over = [dev for dev, limit in self.limits.items() if self.used_bytes(dev) > limit]
        if over:
            lines.append(f"over the limit: {', '.join(over)} (with the KV cache and activations of the layers "
                         f"that run there, disk layers included)")
        if any(d == "disk" and not _LAYER.search(n) for n, d in self.device_map.items()):
            lines.append("cannot load: only decoder layers can be offloaded to disk; give the CPU more memory")
        return "\n".join(lines)


def kv_cache_bytes_per_layer(config: OPTConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Keys and values of one decoder layer for `batch` sequences of `context` tokens."""
    return 2 * batch * context * config.hidden_size * torch.empty(0, dtype=dtype).element_size()


def activation_bytes(config: OPTConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Peak working memory of one prefill of batch x context tokens (an estimate, not a measurement).

    The larger of the attention stage (residual, normed input, q, k, v, output: 6 hidden-sized tensors, plus the
    batch x heads x context^2 score matrix of a non-fused attention kernel) and the MLP stage (residual and
    normed input, fc1's output and its activation), plus fp32 logits for the last position.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    tokens = batch * context
    attention = 6 * tokens * config.hidden_size * size + batch * config.num_attention_heads * context ** 2 * size
    mlp = 2 * tokens * config.hidden_size * size + 2 * tokens * config.ffn_dim * size
    return max(attention, mlp) + batch * config.vocab_size * 4


def meta_model(config: OPTConfig, quantization: QuantizationConfig | None, model_class: type | None = None
               ) -> nn.Module:
    """The model (default: the causal LM) on the meta device, tied, with each quantized Linear already its
    empty bitsandbytes module: what `qopt.load` fills and what `plan` measures."""
    from .model import OPTForCausalLM

    with init_empty_weights(include_buffers=False):
        model = (model_class or OPTForCausalLM)(config)
    model.tie_weights()  # init_empty_weights re-creates each assigned parameter, which unties the head
    if quantization is not None:
        swap_linears_on_meta(model, quantization)
    return model


def plan(source: OPTConfig | str | os.PathLike, bits: int = 4, max_memory: dict[Any, Any] | None = None,
         context: int = 2048, batch: int = 1, *, quant_type: str = "nf4", double_quant: bool = False,
         dtype: torch.dtype = torch.bfloat16, strategy: str = "auto") -> MemoryPlan:
    """The memory plan for a model (config, folder or size name) at a bit width, before any weight is read."""
    config, label = config_for(source)
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got {context} and {batch}")
    quant = None if bits == 16 else QuantizationConfig(
        load_in_8bit=bits == 8, load_in_4bit=bits == 4, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    model = meta_model(config, quant)
    kv_layer = kv_cache_bytes_per_layer(config, context, batch, dtype)
    act = activation_bytes(config, context, batch, dtype)
    memory = normalize_max_memory(max_memory)
    device_map = infer_device_map(model, dtype, strategy, memory, kv_layer, act)
    result = MemoryPlan(label, quant.name if quant else "16-bit", dtype, context, batch, device_map,
                        {str(k): v for k, v in memory.items()}, activation_bytes=act,
                        parameters=_parameter_count(model))
    sizes = compute_module_sizes(sizing_view(model, dtype), dtype=dtype)
    main = str(next(iter(memory)))
    for name, device in device_map.items():
        dev = str(device)
        result.weight_bytes[dev] = result.weight_bytes.get(dev, 0) + sizes[name]
        layers = sum(1 for n in sizes if _LAYER.search(n) and (n == name or n.startswith(name + ".") or not name))
        kv_dev = main if dev == "disk" else dev
        if layers:
            result.kv_cache_bytes[kv_dev] = result.kv_cache_bytes.get(kv_dev, 0) + layers * kv_layer
    return result


def _parameter_count(model: nn.Module) -> int:
    """Weights as numbers (4-bit placeholders count their logical shape)."""
    total = 0
    for module in model.modules():
        if is_quantized(module):
            total += module.out_features * module.in_features + (module.out_features if module.bias is not None
                                                                  else 0)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total - (model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0)
