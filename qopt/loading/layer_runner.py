"""Layer-major execution: every micro-batch passes through decoder layer i before layer i + 1 is brought in.

A model with decoder layers on disk normally rebuilds each of them at every forward: an evaluation of N windows
reads the offloaded bytes N times, and every generated token reads them again per sequence. `LayerRunner`
turns the loop inside out: one pass holds one layer resident (read once, through `Prefetcher`, while the
previous layer computes) and runs all micro-batches through it, so a pass reads each offloaded layer once
however many sequences it serves. The hidden states between layers wait in a `HiddenStore`: host memory up to
a budget, files in the offload folder past it.

Each layer computes exactly what the model's own forward computes for the same micro-batch (the decoder's
`embed` and `finish` are shared with `OPTDecoder.forward`), so results match the window-major run up to the
rounding differences of batching several sequences into one matmul.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.cache import KVCache
from ..place.offload import RebuildOnForward, offloaded_tensors
from ..place.offload_io import OffloadStore, Prefetcher, read_exact
from ..place.sizes import DEFAULT_PREFETCH_DEPTH
from ..utils import format_bytes, parse_size

DEFAULT_HIDDEN_BUDGET = "2GiB"  # host memory for hidden states between layers before they spill to disk


def decoder_of(model: nn.Module) -> nn.Module:
    """The `OPTDecoder` of a qopt model (with or without a head)."""
    return model.get_decoder()


def layer_hooks(model: nn.Module) -> dict[int, RebuildOnForward]:
    """Decoder layer index -> the hook that rebuilds it, for the layers a load placed on disk or in host RAM."""
    hooks = {}
    for index, layer in enumerate(decoder_of(model).layers):
        hook = getattr(layer, "_hf_hook", None)
        if isinstance(hook, RebuildOnForward):
            hooks[index] = hook
    return hooks


def has_offloaded_layers(model: Any) -> bool:
    """True for a qopt model with at least one decoder layer on disk or in host RAM (anything else: False)."""
    return callable(getattr(model, "get_decoder", None)) and bool(layer_hooks(model))


class HiddenStore(MutableSequence):
    """The hidden states of many micro-batches between two layers: host memory up to `budget` bytes; slots past
    it live as raw files in a folder under `folder` (removed by `close`)."""

    def __init__(self, budget: int | str = DEFAULT_HIDDEN_BUDGET, folder: str | os.PathLike | None = None) -> None:
        self.budget = parse_size(budget)
        self.parent = folder
        self.folder: str | None = None
        self.slots: list[torch.Tensor | tuple[str, torch.Size, torch.dtype]] = []
        self.in_memory = 0
        self.peak_in_memory = 0
        self.spilled_bytes = 0  # bytes of the slots that live on disk now
        self.spill_written = 0
        self.spill_read = 0

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        slot = self.slots[index]
        if isinstance(slot, torch.Tensor):
            return slot
        path, shape, dtype = slot
        size = shape.numel() * torch.empty(0, dtype=dtype).element_size()
        buffer = torch.empty(size, dtype=torch.uint8)
        read_exact(path, memoryview(buffer.numpy()))
        self.spill_read += size
        return buffer.view(dtype).reshape(shape)

    def _place(self, index: int, value: torch.Tensor, old: Any) -> torch.Tensor | tuple:
        value = value.detach().to("cpu").contiguous()
        size = value.numel() * value.element_size()
        if isinstance(old, torch.Tensor):
            self.in_memory -= old.numel() * old.element_size()
        if isinstance(old, torch.Tensor | type(None)) and self.in_memory + size <= self.budget:
            self.in_memory += size
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            return value
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="qopt-hidden-", dir=self.parent)
        path = os.path.join(self.folder, f"{index}.bin")
        with open(path, "wb") as file:
            file.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
        if not isinstance(old, tuple):
            self.spilled_bytes += size
        self.spill_written += size
        return path, value.shape, value.dtype

    def __setitem__(self, index: int, value: torch.Tensor) -> None:  # type: ignore[override]
        self.slots[index] = self._place(index, value, self.slots[index])

    def __delitem__(self, index: int) -> None:  # type: ignore[override]
        raise TypeError("HiddenStore slots are replaced, never deleted")

    def insert(self, index: int, value: torch.Tensor) -> None:
        if index != len(self.slots):
            raise TypeError("HiddenStore only appends")
        self.slots.append(None)  # type: ignore[arg-type]
        self.slots[index] = self._place(index, value, None)

    def describe(self) -> dict[str, Any]:
        """What the result reports: the budget and where the hidden states lived."""
        return {"hidden_budget": self.budget, "hidden_peak_in_memory": self.peak_in_memory,
                "hidden_spilled": self.spilled_bytes, "hidden_spill_written": self.spill_written,
                "hidden_spill_read": self.spill_read}

    def close(self) -> None:
        self.slots.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class PassStats:
    """Where a streamer's time went, summed over its passes."""

    passes: int = 0
    layer_seconds: float = 0.0  # running micro-batches through layers
    wait_seconds: float = 0.0  # waiting for an offloaded layer's bytes (all of the read without prefetch)
    rebuild_seconds: float = 0.0  # turning read bytes into modules and back
    host_bytes: int = 0  # copied from host RAM for the layers placed "host"


class LayerRunner:
    """Runs a qopt model's decoder layers layer-major over micro-batches, each offloaded layer read once a pass.

    `prefetch` reads up to `depth` offloaded layers ahead in a background thread; without it each layer is read
    when its turn comes. Layers on a CPU or GPU are used where they are (their hooks move the inputs).
    """

    def __init__(self, model: nn.Module, prefetch: bool = True, depth: int = DEFAULT_PREFETCH_DEPTH) -> None:
        self.model = model
        self.decoder = decoder_of(model)
        self.hooks = layer_hooks(model)
        store = offloaded_tensors(model)
        self.store: OffloadStore | None = store if isinstance(store, OffloadStore) else None
        self.depth = depth if prefetch else 0
        self.stats = PassStats()

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded layers' standard tensors (what one pass reads before any CPU layout exists)."""
        if self.store is None:
            return 0
        prefixes = tuple(hook.prefix for hook in self.hooks.values())
        return sum(self.store.nbytes(k) for k in self.store if k.startswith(prefixes))

    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: int = 0,
              position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, attention mask) for the first decoder layer, as the model's forward computes them."""
        decoder = self.decoder
        return decoder.embed(decoder.embed_tokens(ids), attention_mask, past, position_ids)

    def run(self, hidden: MutableSequence[torch.Tensor], masks: Sequence[torch.Tensor | None],
            caches: Sequence[KVCache | None] | None = None, progress: Any = None) -> None:
        """One pass: replace `hidden[j]` by the last decoder layer's output for micro-batch j (attention mask
        `masks[j]`, KV cache `caches[j]`). `progress` (a tqdm bar) advances by one per layer."""
        layers = self.decoder.layers
        # disk layers come through the prefetcher; host layers are copied from RAM when their turn comes
        order = [self.hooks[i].prefix for i in range(len(layers)) if i in self.hooks and self._on_disk(self.hooks[i])]
        began = time.perf_counter()
        with Prefetcher(self.store, order, self.depth) if self.store is not None else _NoReads() as fetch:
            for index, layer in enumerate(layers):
                hook = self.hooks.get(index)
                if hook is not None:
                    waited = time.perf_counter()
                    if self._on_disk(hook):
                        tensors = fetch.get(hook.prefix)
                    else:
                        tensors = hook.fetch()
                        self.stats.host_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
                    rebuilt = time.perf_counter()
                    self.stats.wait_seconds += rebuilt - waited
                    hook.materialize(layer, tensors)
                    hook.resident = True
                    self.stats.rebuild_seconds += time.perf_counter() - rebuilt
                try:
                    for j in range(len(hidden)):
                        cache = caches[j] if caches is not None else None
                        hidden[j] = layer(hidden[j], masks[j], None, cache, False)[0]
                finally:
                    if hook is not None:
                        released = time.perf_counter()
                        hook.resident = False
                        hook.release(layer)
                        if self._on_disk(hook):
                            fetch.done(hook.prefix)
                        self.stats.rebuild_seconds += time.perf_counter() - released
                if progress is not None:
                    progress.update(1)
        self.stats.passes += 1
        self.stats.layer_seconds += time.perf_counter() - began

    def _on_disk(self, hook: RebuildOnForward) -> bool:
        return self.store is not None and hook.weights is self.store

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> what the output head reads (final layer norm, projection)."""
        return self.decoder.finish(hidden)


class _NoReads:
    """Stands in for a prefetcher when nothing is on disk."""

    def get(self, prefix: str) -> dict[str, torch.Tensor]:
        raise RuntimeError(f"{prefix}: no offload store to read from")

    def done(self, prefix: str) -> None:
        pass

    def __enter__(self) -> _NoReads:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def describe_budget(info: dict[str, Any]) -> str:
    """One line on where a streamed run kept its hidden states."""
    line = (f"hidden states: peak {format_bytes(info['hidden_peak_in_memory'])} in memory "
            f"(budget {format_bytes(info['hidden_budget'])})")
    if info.get("hidden_spilled"):
        line += f", {format_bytes(info['hidden_spilled'])} spilled to disk"
    return line
