"""The memory plan behind `qopt plan`: the loader's placement computed from a config alone, with each decoder
layer's KV cache inside that layer's placeholder and activation memory reserved on every device, so the device
map keeps room for generation.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import compute_module_sizes
from torch import nn

from ..bundled import data_dir
from ..errors import ConfigError
from ..io.hub import ModelSource, is_hub_id, resolve_model
from ..model.config import OPTConfig
from ..model.network import decoder_layer_index, is_decoder_layer
from ..quant.config import QuantizationConfig
from ..quant.modules import is_quantized
from ..utils import format_bytes
from .device_map import device_of, format_ranges, normalize_max_memory, summarize
from .placement import GenerationBudget, computes_on_cpu, default_context, place, resolve_dtype
from .sizes import DeviceMap, cpu_layout_bytes, meta_model, sizing_view
from .strategies import STRATEGIES

logger = logging.getLogger(__name__)
HOST_TO_GPU_BYTES_PER_S = 20e9  # pinned host -> GPU copies over PCIe 4.0 x16 (about 25 GB/s peak): an assumption


# -- configs by name ------------------------------------------------------------------------------------------
def config_for(source: OPTConfig | ModelSource | str | os.PathLike) -> tuple[OPTConfig, str]:
    """(config, label) from an OPTConfig, a checkpoint folder / config.json, a Hub id (`org/name`: its
    config.json from the HF cache or the Hub), or a size name like "opt-30b" (qopt's built-in shapes)."""
    if isinstance(source, OPTConfig):
        return source, "config"
    if isinstance(source, str) and "/" in source and is_hub_id(source):
        source = resolve_model(source)
    if isinstance(source, ModelSource):
        return OPTConfig.from_pretrained(source.folder), source.label
    path = Path(source)
    key = "opt-" + str(source).lower().removeprefix("facebook/").removeprefix("opt-").removeprefix("opt")
    folder = data_dir() / "configs"
    if path.exists():
        if str(source) == key and _is_size_name(key, folder):
            logger.warning("%s: a folder of that name is here: planning it, not the built-in shape (pass ./%s "
                           "to silence this, or run elsewhere for the built-in shape)", source, source)
        return OPTConfig.from_pretrained(path), str(path)
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


def _is_size_name(key: str, folder: Path) -> bool:
    return (folder / f"{key}.json").exists() or key in json.loads((folder / "paper_shapes.json").read_text())


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Where an OPT model's weights, KV cache and activations go, computed before any weight is read.

    Byte counts are per device name ("0", "cpu", "disk", "host": stored in CPU RAM, run on the main GPU);
    `limits` are the `max_memory` the plan was made for.
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
    strategy: str = "auto"
    read_bandwidth: float | None = None  # bytes/s of the disk under the offload folder, for time estimates
    bandwidth_source: str = ""  # how it was obtained ("measured in /tmp", "given")
    stream_buffer_bytes: int = 0  # on the main GPU: host layers brought in at once (the one computing + prefetch)
    read_buffer_bytes: dict[str, int] = field(default_factory=dict)  # disk layers read ahead into CPU RAM
    kv_dtype: torch.dtype | None = None  # float32 where the whole model computes on the CPU
    cpu_layout_bytes: int = 0  # on the CPU: the bf16 absmax copies of the 4-bit layers' CPU kernel layout
    packed_head_bytes: int = 0  # on the CPU: the output head's oneDNN copy that generate keeps
    quant_type: str = ""  # "nf4" / "fp4" for 4-bit plans: spelled out by `flags()`
    double_quant: bool = False
    all_logits: bool = False  # planned for scoring every position (perplexity), not for generation

    @property
    def main_device(self) -> str:
        return next(iter(self.limits))

    def used_bytes(self, device: str) -> int:
        """What `device` holds: its weights, KV cache and activations; the CPU also stores the host layers'
        weights, the main GPU the buffers they are brought into."""
        if device == "host":
            return self.weight_bytes.get("host", 0)
        runs = device != "disk" and (device in self.kv_cache_bytes or device in self.weight_bytes)
        used = self.weight_bytes.get(device, 0) + self.kv_cache_bytes.get(device, 0) + \
            (self.activation_bytes if runs else 0)
        if device == "cpu":
            used += self.weight_bytes.get("host", 0) + self.cpu_layout_bytes + self.packed_head_bytes
        return used + (self.stream_buffer_bytes if device == self.main_device else 0) + \
            self.read_buffer_bytes.get(device, 0)

    @property
    def fits(self) -> bool:
        """Whole model, KV cache and activations on the first (fastest) device of `max_memory`."""
        main = self.main_device
        return set(map(str, self.device_map.values())) == {main} and self.used_bytes(main) <= self.limits[main]

    @property
    def loadable(self) -> bool:
        """Nothing over its limit and only decoder layers on disk (embeddings and head are shared or tied)."""
        over = any(self.used_bytes(dev) > limit for dev, limit in self.limits.items())
        return not over and all(d != "disk" or is_decoder_layer(n) for n, d in self.device_map.items())

    @property
    def verdict(self) -> str:
        """One line over all devices: "fits: GPUs 0-1", "fits: GPU 0 + CPU", "needs disk: layers 35-63" or
        "cannot load: ..."."""
        over = [f"{'GPU ' if dev.isdigit() else ''}{dev} needs {format_bytes(self.used_bytes(dev))} of "
                f"{format_bytes(limit)}" for dev, limit in self.limits.items() if self.used_bytes(dev) > limit]
        if over:
            return "cannot load: " + "; ".join(over)
        if not self.loadable:
            return "cannot load: only decoder layers can be offloaded to disk; give the CPU more memory"
        disk = [decoder_layer_index(n) for n, d in self.device_map.items() if d == "disk"]
        if disk:
            return f"needs disk: layers {format_ranges(sorted(disk))}"
        used = sorted({str(d) for d in self.device_map.values()}, key=lambda d: (not d.isdigit(), d))
        gpus = [int(d) for d in used if d.isdigit()]
        parts = ([f"GPU {gpus[0]}" if len(gpus) == 1 else f"GPUs {format_ranges(gpus)}"] if gpus else []) + \
            ["CPU" for d in used if d == "cpu"] + ["layers streamed from host RAM" for d in used if d == "host"]
        return "fits: " + " + ".join(parts)

    def precision_flags(self) -> str:
        """`--bits 4 --quant-type nf4 ...`: the precision a load must ask for to get this plan's sizes."""
        if self.quantization == "16-bit":
            return f"--bits 16 --dtype {str(self.dtype).removeprefix('torch.')}"
        if self.quantization == "int8":
            return "--bits 8"
        return f"--bits 4 --quant-type {self.quant_type or 'nf4'}" + (" --double-quant" if self.double_quant else "")

    def placement_flags(self) -> str:
        """The `qopt` placement flags that load the model this way (the same limits, the same strategy)."""
        memory = " ".join(f"{dev}={_exact_size(limit)}" for dev, limit in self.limits.items())
        disk = " --offload-folder DIR" if "disk" in map(str, self.device_map.values()) else ""
        disk += " --stream-from-host" if "host" in map(str, self.device_map.values()) else ""
        if set(map(str, self.device_map.values())) == {"cpu"} and not disk:
            return "--device-map cpu"
        return f"--device-map {self.strategy} --max-memory {memory}{disk}"

    def flags(self) -> str:
        """The whole `load with:` line: precision, placement and the generation budget the map reserves, so
        `qopt generate` / `qopt eval` with these flags place exactly this map."""
        batch = f" --batch-size {self.batch}" if self.batch > 1 else ""
        return f"{self.precision_flags()} {self.placement_flags()} --context {self.context}{batch}"

    def format(self) -> str:
        count = f"{self.parameters / 1e9:.2f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.1f}M"
        lines = [f"{self.label}: {count} parameters, {self.quantization} "
                 f"(other tensors {str(self.dtype).removeprefix('torch.')}), context {self.context}, "
                 f"batch {self.batch}",
                 f"weights {format_bytes(sum(self.weight_bytes.values()))}, "
                 f"KV cache {format_bytes(sum(self.kv_cache_bytes.values()))}, "
                 f"activations {format_bytes(self.activation_bytes)} per device (estimate)",
                 f"{'device':8s} {'limit':>12s} {'weights':>12s} {'KV cache':>12s} {'activations':>12s} "
                 f"{'total':>12s}"]
        for dev in [*self.limits, "host", "disk"]:
            if dev in self.weight_bytes or dev in self.kv_cache_bytes:
                act = self.activation_bytes if dev not in ("disk", "host") else 0
                limit = format_bytes(self.limits[dev]) if dev in self.limits else "(cpu)" if dev == "host" else "-"
                lines.append(f"{dev:8s} {limit:>12s} {format_bytes(self.weight_bytes.get(dev, 0)):>12s} "
                             f"{format_bytes(self.kv_cache_bytes.get(dev, 0)):>12s} {format_bytes(act):>12s} "
                             f"{format_bytes(self.used_bytes(dev)):>12s}")
        if self.cpu_layout_bytes or self.packed_head_bytes:
            lines.append(f"cpu also holds (in its total): {format_bytes(self.cpu_layout_bytes)} of CPU kernel layout "
                         f"(bf16 absmax beside the saved statistics), {format_bytes(self.packed_head_bytes)} of "
                         f"packed output head (kept by generate)")
        if self.read_buffer_bytes:
            lines.append("disk layers read ahead (in the totals): " + ", ".join(
                f"{format_bytes(size)} on {dev}" for dev, size in self.read_buffer_bytes.items()) +
                " (the layer computing uses the one-layer margin kept free on the main devices)")
        lines.append("device map: " + "; ".join(summarize(self.device_map)))
        lines += self.disk_read_lines() + self.host_copy_lines()
        over = [dev for dev, limit in self.limits.items() if self.used_bytes(dev) > limit]
        if over:
            lines.append(f"over the limit: {', '.join(over)} (with the KV cache and activations of the layers "
                         f"that run there, disk layers included)")
        lines.append(f"verdict: {self.verdict}")
        if self.loadable:
            lines.append(f"load with: {self.flags()}")
        return "\n".join(lines)


    def host_copy_lines(self) -> list[str]:
        """What the host layers cost in copies to the GPU: each once per decode step and per layer-major pass."""
        host = self.weight_bytes.get("host", 0)
        if not host:
            return []
        return [f"host layers: {format_bytes(host)} in CPU RAM (counted in cpu's total), copied to GPU "
                f"{self.main_device} once per generated token (shared by every prompt of a throughput step) and once "
                f"per layer-streamed evaluation pass; {format_bytes(self.stream_buffer_bytes)} of GPU memory for "
                f"the layers in flight: {host / HOST_TO_GPU_BYTES_PER_S:.2f} s per pass at "
                f"{format_bytes(HOST_TO_GPU_BYTES_PER_S)}/s (pinned PCIe 4.0 x16, typical)"]

    def disk_read_lines(self) -> list[str]:
        """What the offloaded layers cost in reads: every decode step and every layer-streamed evaluation pass
        reads each of them once (a window-major evaluation, once per window), with times at `read_bandwidth`."""
        disk = self.weight_bytes.get("disk", 0)
        if not disk:
            return []
        lines = [f"disk reads: {format_bytes(disk)} per generated token (one decode step; in throughput mode "
                 f"shared by every prompt of the step), {format_bytes(disk)} per layer-streamed evaluation pass "
                 f"(window-major: per window)"]
        if self.read_bandwidth:
            seconds = disk / self.read_bandwidth
            lines.append(f"read time at {format_bytes(self.read_bandwidth)}/s ({self.bandwidth_source}): "
                         f"{seconds:.2f} s per generated token, {seconds:.2f} s per evaluation pass "
                         f"(at least; prefetch hides compute behind the reads)")
        return lines


def plan(source: OPTConfig | str | os.PathLike, bits: int = 4, max_memory: dict[Any, Any] | None = None,
         context: int | None = None, batch: int = 1, *, quant_type: str = "nf4", double_quant: bool = False,
         dtype: str | torch.dtype | None = "auto", strategy: str = "auto", stream_from_host: bool = False,
         all_logits: bool = False) -> MemoryPlan:
    """The memory plan for a model (config, folder or size name) at a bit width, before any weight is read: the
    placement `qopt.load` computes with the same limits and `context=` / `batch=` (`flags()` spells them).
    `context` defaults to min(2048, the model's positions); `dtype` is resolved as `load` resolves it ("auto":
    the checkpoint's). `stream_from_host`: the decoder layers planned for the CPU stay in its RAM but run on the
    GPU ("host"). `all_logits`: plan for perplexity (every position of a window scored) rather than generation."""
    config, label = config_for(source)
    quant = QuantizationConfig.from_bits(bits, quant_type, double_quant)  # as `--bits` loads (bf16 compute)
    budget = GenerationBudget(default_context(config) if context is None else context, batch, all_logits)
    budget.check(config, label)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    memory = normalize_max_memory(max_memory)
    dtype = resolve_dtype(dtype, config, on_cpu=computes_on_cpu(strategy, memory))
    model = meta_model(config, quant)
    placement = place(model, dtype, strategy, memory, budget, stream_from_host, label)
    device_map = placement.device_map
    result = MemoryPlan(label, quant.name if quant else "16-bit", dtype, budget.context, budget.batch, device_map,
                        {str(k): v for k, v in memory.items()}, activation_bytes=placement.activation_bytes,
                        parameters=_parameter_count(model), strategy=strategy, kv_dtype=placement.kv_dtype,
                        quant_type=quant_type if bits == 4 else "", double_quant=bits == 4 and double_quant,
                        all_logits=all_logits)
    sizes = compute_module_sizes(sizing_view(model, dtype), dtype=dtype)
    main = str(next(iter(memory)))
    for name, device in device_map.items():
        dev = str(device)
        result.weight_bytes[dev] = result.weight_bytes.get(dev, 0) + sizes[name]
        layers = sum(1 for n in sizes if is_decoder_layer(n) and (n == name or n.startswith(name + ".") or not name))
        kv_dev = main if dev in ("disk", "host") else dev
        if layers:
            result.kv_cache_bytes[kv_dev] = result.kv_cache_bytes.get(kv_dev, 0) + \
                layers * placement.kv_bytes_per_layer
    result.stream_buffer_bytes = placement.in_flight_bytes if "host" in device_map.values() else 0
    result.read_buffer_bytes = {str(k): v for k, v in placement.read_buffer_bytes.items()}
    if placement.cpu_layout:
        result.cpu_layout_bytes = sum(cpu_layout_bytes(m) for n, m in model.named_modules()
                                      if is_quantized(m) and device_of(n, device_map) == "cpu")
    result.packed_head_bytes = placement.packed_head_bytes
    return result


def _exact_size(nbytes: int) -> str:
    """A size that parses back to the same bytes: the largest binary unit that divides it."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


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
