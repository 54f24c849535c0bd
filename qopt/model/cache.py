"""The preallocated KV cache: one key and one value buffer per layer, on that layer's device.

Decoding writes each new token in place (no concatenation of the whole cache per token); when a buffer is
full it grows by doubling, so a cache sized up front by `generate` never reallocates. `dtype` stores the states
in another precision: `generate` keeps a 16-bit model's cache in fp32 on CPU, where a decode step's attention
computes in fp32, so the cached keys and values are not converted again at every step.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0, dtype: torch.dtype | None = None) -> None:
        self.capacity = capacity
        self.dtype = dtype  # None: the states' own dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @classmethod
    def from_legacy(cls, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> KVCache:
        """Accept HF's tuple-of-(key, value) format, each (batch, heads, seq, head_dim)."""
        cache = cls(len(past))
        for layer, (k, v) in enumerate(past):
            cache.update(layer, k, v)
        return cache

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (batch, heads, new, head_dim) states; return views of everything cached so far."""
        start, new = self.lengths[layer], key.shape[2]
        end = start + new
        buf_k = self.keys[layer]
        dtype = self.dtype or key.dtype
        if buf_k is None or end > buf_k.shape[2] or buf_k.device != key.device or buf_k.dtype != dtype:
            size = max(end, self.capacity, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            shape = (key.shape[0], key.shape[1], size, key.shape[3])
            grown_k = key.new_empty(shape, dtype=dtype)
            grown_v = value.new_empty(shape, dtype=dtype)
            if buf_k is not None and start:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = self.values[layer][:, :, :start]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows in place (beam search)."""
        for layer, buf in enumerate(self.keys):
            if buf is not None:
                idx = beam_idx.to(buf.device)
                self.keys[layer] = buf.index_select(0, idx)
                self.values[layer] = self.values[layer].index_select(0, idx)

    def crop(self, length: int) -> None:
        self.lengths = [min(n, length) for n in self.lengths]

    # legacy view: cache[layer] -> (key, value), len(cache) -> layers
    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lengths[layer]
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def __len__(self) -> int:
        return len(self.keys)

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self[i] for i in range(len(self)))
