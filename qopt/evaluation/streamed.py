"""Perplexity of a model with decoder layers on disk, layer-major: each offloaded layer is read once per evaluation.

`evaluate_ids` comes here when a decoder layer is offloaded. All windows are embedded, cut into micro-batches,
and passed through layer 0, then layer 1, ... (`qopt.loading.layer_runner.LayerRunner`); the hidden states wait
in host memory up to a budget and in the offload folder past it. The output head then runs window by window
with the same scoring as the window-major loop (`_Totals`), so the numbers agree with it to float rounding. A
reference that is offloaded too runs the same way first; one in memory runs window by window at scoring time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..loading.layer_runner import (
    DEFAULT_HIDDEN_BUDGET,
    DEFAULT_PREFETCH_DEPTH,
    HiddenStore,
    LayerRunner,
    has_offloaded_layers,
)
from ..model.network import input_device
from .perplexity import PerplexityResult, Window, _forward_fn, _Totals


def default_micro_batch(seqlen: int) -> int:
    """Windows per micro-batch: about 2,048 tokens, so short windows still make matmuls of useful size."""
    return max(1, min(16, 2048 // seqlen))


def _streamed_pass(model: Any, ids: torch.Tensor, groups: Sequence[Sequence[Window]], budget: int | str,
                   prefetch: bool, depth: int, progress: bool, desc: str) -> tuple[LayerRunner, HiddenStore]:
    """Every micro-batch through every decoder layer; returns the streamer and the last layer's outputs."""
    streamer = LayerRunner(model, prefetch=prefetch, depth=depth)
    folder = streamer.store.save_folder if streamer.store is not None else None
    hidden = HiddenStore(budget, folder)
    device = input_device(model)
    masks, by_size = [], {}
    try:
        for group in groups:
            chunk = torch.stack([ids[w.begin:w.end] for w in group]).to(device)
            states, mask = streamer.embed(chunk)
            hidden.append(states)
            masks.append(by_size.setdefault(len(group), mask))  # windows of one size share the causal mask
        bar = tqdm(total=len(streamer.decoder.layers), desc=f"{desc} (layer-major)", unit="layer",
                   disable=not progress, leave=False)
        with bar:
            streamer.run(hidden, masks, progress=bar)
    except BaseException:
        hidden.close()
        raise
    return streamer, hidden


def _window_logits(model: Any, streamer: LayerRunner, states: torch.Tensor, row: int) -> torch.Tensor:
    """Logits of one window (row of a micro-batch's final hidden states), as `model(ids).logits[0]` gives them."""
    head_input = streamer.head_input(states[row:row + 1])
    head = model.lm_head
    return head(head_input.to(head.weight.device))[0]


@torch.no_grad()
def evaluate_streamed(model: Any, ids: torch.Tensor, windows: Sequence[Window], seqlen: int, stride: int | None,
                      reference: Any = None, progress: bool = True, desc: str = "Perplexity", *,
                      micro_batch: int | None = None, hidden_budget: int | str = DEFAULT_HIDDEN_BUDGET,
                      prefetch: bool = True, depth: int = DEFAULT_PREFETCH_DEPTH) -> PerplexityResult:
    """`evaluate_ids`' result for `windows`, computed layer-major (see the module docstring).

    `micro_batch` windows go through a layer together (default `default_micro_batch`); `hidden_budget` bounds
    the host memory of the hidden states between layers; `prefetch` / `depth` read offloaded layers ahead.
    The result's `streaming` says what was read and where the hidden states lived.
    """
    micro_batch = micro_batch or default_micro_batch(seqlen)
    if micro_batch < 1:
        raise ValueError(f"micro_batch {micro_batch}: expected an integer >= 1")
    groups = [windows[k:k + micro_batch] for k in range(0, len(windows), micro_batch)]
    store = getattr(model, "_qopt_offloaded", None)
    read_before = getattr(store, "bytes_read", 0)
    ref_stream = ref_hidden = None
    if reference is not None and has_offloaded_layers(reference):
        ref_stream, ref_hidden = _streamed_pass(reference, ids, groups, hidden_budget, prefetch, depth, progress,
                                                f"{desc} reference")
    ref_forward = _forward_fn(reference) if reference is not None and ref_stream is None else None
    ref_device = input_device(reference) if ref_forward is not None else None
    began = time.perf_counter()
    streamer, hidden = _streamed_pass(model, ids, groups, hidden_budget, prefetch, depth, progress, desc)
    seconds = time.perf_counter() - began
    totals = _Totals()
    try:
        bar = tqdm(total=len(windows), desc=f"{desc} (scoring)", unit="window", disable=not progress, leave=False)
        with bar:
            for g, group in enumerate(groups):
                states = hidden[g]
                ref_states = ref_hidden[g] if ref_hidden is not None else None
                for row, window in enumerate(group):
                    labels = ids[window.begin:window.end][window.score_from:]
                    began = time.perf_counter()
                    logits = _window_logits(model, streamer, states, row)[window.score_from - 1:-1]
                    if logits.device.type == "cuda":
                        torch.cuda.synchronize(logits.device)
                    seconds += time.perf_counter() - began
                    ref_logits = None
                    if ref_states is not None:
                        ref_logits = _window_logits(reference, ref_stream, ref_states, row)
                    elif ref_forward is not None:
                        ref_logits = ref_forward(ids[window.begin:window.end][None].to(ref_device))[0]
                    if ref_logits is not None:
                        ref_logits = ref_logits[window.score_from - 1:-1]
                    totals.add_window(logits, labels, ref_logits)
                    bar.update(1)
                    if progress:
                        bar.set_postfix(ppl=f"{math.exp(totals.nll / totals.count):.3f}", refresh=False)
        info = {"mode": "layer-major", "micro_batch": micro_batch, "prefetch": streamer.depth,
                "offloaded_bytes": streamer.offloaded_bytes,
                "bytes_read": getattr(store, "bytes_read", 0) - read_before,
                "host_bytes_copied": streamer.stats.host_bytes, **hidden.describe()}
    finally:
        hidden.close()
        if ref_hidden is not None:
            ref_hidden.close()
    return totals.result(len(windows), seconds, int(ids.numel()), seqlen, stride, reference is not None,
                         streaming=info)
