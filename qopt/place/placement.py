"""The one placement `qopt.plan` and `qopt.load` share: the dtype of what stays unquantized, the generation
budget kept free beside the weights, and the device map.

A map that only counts weights (accelerate's `infer_auto_device_map` with a plain `max_memory`) fills a GPU to
the brim and runs out of memory at the first long prompt. Here each layer carries its KV cache, every device
that computes keeps room for the activations, and the device that computes the offloaded layers (the main
device) also holds their KV caches and the layers in flight; layers move down (GPU -> CPU -> disk) until all of
that fits, so a plan's verdict and a load's map are the same computation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import compute_module_sizes
from torch import nn

from ..model.config import OPTConfig
from ..model.network import LAYER_PREFIX, is_decoder_layer
from ..quant.modules import cpu_repacks
from ..utils import FLOAT_DTYPES
from .device_map import host_placement, infer_device_map, normalize_max_memory
from .sizes import (
    DEFAULT_PREFETCH_DEPTH,
    DeviceMap,
    activation_bytes,
    kv_cache_bytes_per_layer,
    packed_head_bytes,
    sizing_view,
)
from .strategies import STRATEGIES

DEFAULT_CONTEXT = 2048  # OPT's max_position_embeddings; smaller models are capped at their own


def default_context(config: OPTConfig) -> int:
    return min(DEFAULT_CONTEXT, config.max_position_embeddings)


def computes_on_cpu(device_map: Any, max_memory: dict[Any, Any] | None = None) -> bool:
    """Whether the whole model computes on the CPU: no GPU here, a CPU map, or limits that name no GPU."""
    if not torch.cuda.is_available():
        return True
    if device_map is None or device_map == "cpu" or (isinstance(device_map, torch.device)
                                                      and device_map.type == "cpu"):
        return True
    if isinstance(device_map, dict):
        return not any(isinstance(d, int) or str(d).startswith("cuda") or d == "host" for d in device_map.values())
    return max_memory is not None and not any(isinstance(k, int) for k in normalize_max_memory(max_memory))


def resolve_dtype(torch_dtype: str | torch.dtype | None, config: OPTConfig, on_cpu: bool) -> torch.dtype:
    """The dtype of the weights left unquantized. "auto" (the default, as in transformers 5) is the checkpoint's
    `torch_dtype`, float32 where it names none, except that float16 becomes bfloat16 where the model computes
    on a CPU: CPU matmul kernels have no fast float16 path, and bfloat16 keeps float16's memory.
    None means float32, as in transformers 4."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        dtype = FLOAT_DTYPES.get(config.torch_dtype or "float32", torch.float32)
        return torch.bfloat16 if dtype == torch.float16 and on_cpu else dtype
    if torch_dtype not in FLOAT_DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r}: expected one of {sorted(FLOAT_DTYPES)} or 'auto'")
    return FLOAT_DTYPES[torch_dtype]


@dataclass(frozen=True)
class GenerationBudget:
    """What generation keeps beside the weights: `batch` sequences of up to `context` tokens each;
    `all_logits` when every position is scored (perplexity) rather than only the last one."""

    context: int
    batch: int = 1
    all_logits: bool = False

    def check(self, config: OPTConfig, source: str) -> None:
        if self.context < 1 or self.batch < 1:
            raise ValueError(f"context and batch must be positive, got {self.context} and {self.batch}")
        if self.context > config.max_position_embeddings:
            raise ValueError(f"context {self.context} exceeds {source}'s max_position_embeddings "
                             f"({config.max_position_embeddings})")

    def kv_dtype(self, dtype: torch.dtype, on_cpu: bool) -> torch.dtype:
        """`generate` keeps the cache in float32 when the whole model computes on the CPU (its attention runs
        in float32 there), else in the model's dtype."""
        return torch.float32 if on_cpu else dtype


@dataclass
class Placement:
    """A device map with the reservations it was made for (bytes; zero without a generation budget)."""

    device_map: DeviceMap
    kv_bytes_per_layer: int = 0
    kv_dtype: torch.dtype | None = None
    activation_bytes: int = 0  # on every device that computes
    in_flight_bytes: int = 0  # on the main GPU when layers stream from host RAM
    read_buffer_bytes: dict[str, int] = field(default_factory=dict)  # disk layers read ahead, per device
    cpu_layout: bool = False  # 4-bit layers carry the CPU kernel's layout (a CPU-only map on an AVX512-BF16 CPU)
    packed_head_bytes: int = 0  # the output head's oneDNN copy, kept on the CPU by generate


def place(model: nn.Module, dtype: torch.dtype, device_map: Any = "auto", max_memory: dict[Any, Any] | None = None,
          budget: GenerationBudget | None = None, stream_from_host: bool = False,
          source: str = "device map") -> Placement:
    """Where each module goes. A given map or single device is taken as is; a strategy is planned with
    `max_memory`, each decoder layer carrying its KV cache, activations kept free on the devices that compute,
    and the main device (first in `max_memory`) holding the caches of the layers it computes for disk or host
    RAM, host RAM the disk layers being read (`_read_buffers`), retried with that reserve until it is enough
    (the reserve only grows, so this ends)."""
    if device_map not in STRATEGIES:
        placed = infer_device_map(model, dtype, device_map)
        return Placement(host_placement(placed, source) if stream_from_host else placed)
    memory = normalize_max_memory(max_memory)
    config = model.config
    on_cpu = not any(isinstance(k, int) for k in memory)
    kv_dtype = budget.kv_dtype(dtype, on_cpu) if budget else None
    kv_layer = kv_cache_bytes_per_layer(config, budget.context, budget.batch, kv_dtype) if budget else 0
    act = activation_bytes(config, budget.context, budget.batch, dtype, budget.all_logits) if budget else 0
    # a CPU-only model takes the CPU kernel's layout at its first forward and generate keeps a packed head
    result = Placement({}, kv_layer, kv_dtype, act, cpu_layout=on_cpu and cpu_repacks(),
                       packed_head_bytes=packed_head_bytes(model, dtype) if on_cpu and budget else 0)
    main = next((k for k in memory if k != "disk"), None)
    host = stream_from_host and isinstance(main, int)
    layer_bytes = compute_module_sizes(sizing_view(model, dtype), dtype=dtype).get(f"{LAYER_PREFIX}0", 0)
    buffered = layer_bytes if budget else 0  # without a budget nothing is reserved, as in transformers
    if host:  # every layer's cache and the layers in flight live on the main GPU: reserved before placing
        result.in_flight_bytes = (1 + DEFAULT_PREFETCH_DEPTH) * layer_bytes
        reserve = {main: result.in_flight_bytes + config.num_hidden_layers * kv_layer}
    else:
        reserve = {main: result.packed_head_bytes}
    while True:
        limits = {k: v if k == "disk" else max(0, v - reserve.get(k, 0)) for k, v in memory.items()}
        placed = infer_device_map(model, dtype, device_map, limits, 0 if host else kv_layer, act, result.cpu_layout)
        if stream_from_host:
            placed = host_placement(placed, source)  # no GPU: the one-line error
        if host:
            break
        needed = _disk_reserve(placed, main, kv_layer, buffered, result.packed_head_bytes)
        if all(v <= reserve.get(k, 0) for k, v in needed.items()):
            break
        reserve = {k: max(reserve.get(k, 0), needed.get(k, 0)) for k in {*reserve, *needed}}
    result.read_buffer_bytes = _read_buffers(placed, main, buffered)
    result.device_map = placed
    return result


def _read_buffers(placed: DeviceMap, main: Any, layer_bytes: int) -> dict[Any, int]:
    """Disk layers in flight beyond the one computing where the CPU computes them: the prefetcher reads
    DEFAULT_PREFETCH_DEPTH layers ahead into the RAM the CPU's budget shares. (The one computing sits in the
    largest-layer margin accelerate keeps free on the main devices whatever the map.) With a GPU computing, the
    CPU budget is what weights may take there (`--cpu 0`: none), so the read-ahead is not charged to it."""
    if not layer_bytes or main != "cpu" or \
            not any(dev == "disk" and is_decoder_layer(name) for name, dev in placed.items()):
        return {}
    return {"cpu": DEFAULT_PREFETCH_DEPTH * layer_bytes}


def _disk_reserve(placed: DeviceMap, main: Any, kv_layer: int, layer_bytes: int, packed_head: int
                  ) -> dict[Any, int]:
    """What a map with disk layers needs kept free beside its weights: their KV caches and the packed head on the
    main device, and their read buffers. Re-placing with it only moves layers down, so the loop above ends."""
    disk = sum(1 for name, dev in placed.items() if dev == "disk" and is_decoder_layer(name))
    needed = {main: packed_head + kv_layer * disk}
    for dev, size in _read_buffers(placed, main, layer_bytes).items():
        needed[dev] = needed.get(dev, 0) + size
    return needed
