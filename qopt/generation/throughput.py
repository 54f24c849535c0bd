"""`generate_many`: many prompts at once on a block schedule, for models whose decoder layers live on disk.

`generate` on one prompt batch rebuilds every offloaded layer at every decode step, and prompts run one batch
after another, so each generated token of each batch reads the offloaded bytes again. Here the prompts are cut
into micro-batches (similar lengths together, left-padded) that advance in lock step: at each decode step every
offloaded layer is brought in once (`qopt.loading.layer_runner.LayerRunner`, read ahead while the previous layer
computes) and serves every micro-batch before the next one is read. Per step the disk is read once, whatever
the number of prompts. Each micro-batch keeps its own KV cache, mask and positions (`DecodeState`), and the
steps are `generate`'s, so a prompt's tokens are those `generate` gives it alone (greedy; to rounding).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import GenerationError
from ..loading.layer_runner import DEFAULT_PREFETCH_DEPTH, LayerRunner
from ..model.network import input_device
from .decoding import DecodeState, GenerationConfig, _as_list, _check_prompt, _new_token_count, _Rows, process_scores
from .lean_forwards import decode_fast_paths


@dataclass
class _MicroBatch:
    """One lock-step group of prompts: their rows, decoding state and where each row came from."""

    order: list[int]  # positions of its rows in the caller's prompt list
    lengths: list[int]  # each row's prompt length (unpadded)
    state: DecodeState
    sequences: torch.Tensor
    rows: _Rows
    length: int
    end: int
    done: bool = False


def _micro_batches(model: nn.Module, prompts: list[torch.Tensor], batch_size: int, config: GenerationConfig,
                   pad: int | None, eos: list[int], device: torch.device) -> list[_MicroBatch]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    batches = []
    fill = pad if pad is not None else 0
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in members)
        ids = torch.full((len(members), width), fill, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, width - len(prompts[i]):] = prompts[i]
            mask[row, width - len(prompts[i]):] = 1
        ids, mask = _check_prompt(ids, mask, pad, eos)
        new_tokens = _new_token_count(config, mask, model.config.max_position_embeddings)
        ids, mask = ids.to(device), mask.to(device)
        sequences = ids.new_full((len(members), width + new_tokens), fill)
        sequences[:, :width] = ids
        batches.append(_MicroBatch(members, [len(prompts[i]) for i in members],
                                   DecodeState(model, mask, new_tokens, True), sequences,
                                   _Rows(len(members), device, eos, pad, None, None), width, width + new_tokens,
                                   done=new_tokens == 0))
    return batches


def _inputs(streamer: LayerRunner, batch: _MicroBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `DecodeState.prefill` / `decode_one_token` feed the model, embedded for the first layer."""
    state, length = batch.state, batch.length
    if length == state.width:  # prefill
        mask = state.mask[:, :length] if state.padded else None
        return streamer.embed(batch.sequences[:, :length], mask, 0, None)
    positions = state.attended + (length - 1 - state.width)
    mask = state.mask[:, :length] if state.padded else None
    return streamer.embed(batch.sequences[:, length - 1:length], mask, length - 1, positions)


@torch.no_grad()
def generate_many(model: nn.Module, prompts: Sequence[Sequence[int] | torch.Tensor], *, batch_size: int = 8,
                  progress: bool = False, prefetch: bool = True, depth: int = DEFAULT_PREFETCH_DEPTH,
                  **kwargs: Any) -> list[torch.Tensor]:
    """Continue every prompt (token ids, `</s>` first as the tokenizer gives them); returns, in prompt order,
    each prompt followed by its new tokens (ending at its end token, if it produced one).

    `batch_size` prompts share a micro-batch; all micro-batches advance together, each offloaded layer read
    once per decode step (see the module docstring). Decoding arguments are `generate`'s for greedy search and
    sampling (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
    `eos_token_id`, `pad_token_id`, `seed`); `max_length` counts a micro-batch's padded width. `progress` shows
    a tqdm bar in tokens per second.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: expected an integer >= 1")
    try:
        config = GenerationConfig(**kwargs)
    except TypeError as err:
        raise GenerationError(f"generate_many(): {err}".replace("GenerationConfig.__init__()", "")) from None
    config.validate()
    if config.mode not in ("greedy", "sample") or config.num_return_sequences != 1 or config.stop_strings:
        raise GenerationError("generate_many(): greedy search or sampling, one sequence per prompt, no stop strings; "
                              "use generate() for beam search, contrastive search or stop strings")
    eos = _as_list(config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    pad = eos[0] if pad is None and eos else pad
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu() for p in prompts]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise GenerationError(f"generate_many(): prompt {i} has no tokens; OPT prompts start with </s> (id 2)")
    if not rows:
        return []
    was_training = model.training
    model.eval()
    device = input_device(model, torch.device("cpu"))
    batches = _micro_batches(model, rows, batch_size, config, pad, eos, device)
    streamer = LayerRunner(model, prefetch=prefetch, depth=depth)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    total = sum(len(b.order) * (b.end - b.length) for b in batches)
    bar = tqdm(total=total, desc="Generating", unit="tok", unit_scale=True, disable=not progress)
    try:
        with bar, decode_fast_paths(model, max(b.end - b.length for b in batches)):
            while True:
                active = [b for b in batches if not b.done]
                if not active:
                    break
                embedded = [_inputs(streamer, b) for b in active]
                hidden = [h for h, _ in embedded]
                streamer.run(hidden, [m for _, m in embedded], [b.state.cache for b in active])
                for batch, states in zip(active, hidden, strict=True):
                    bar.update(int(batch.rows.unfinished.sum()))
                    _step(model, streamer, batch, states, config, generator)
    finally:
        model.train(was_training)
    return _collect(batches, len(rows), eos)


def _step(model: nn.Module, streamer: LayerRunner, batch: _MicroBatch, states: torch.Tensor,
          config: GenerationConfig, generator: torch.Generator | None) -> None:
    """The head on the newest position, then `greedy_or_sample`'s token choice and bookkeeping."""
    head = model.lm_head
    logits = head(streamer.head_input(states)[:, -1:].to(head.weight.device))[:, -1]
    logits = logits.to(batch.sequences.device, torch.float32)
    scores = process_scores(logits, batch.sequences, batch.length, batch.state, config, warp=config.do_sample)
    if config.do_sample:
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    else:
        tokens = scores.argmax(-1)
    finished = batch.rows.push(batch.sequences, batch.length, tokens)
    batch.length += 1
    batch.done = finished or batch.length == batch.end
    if batch.done:
        batch.state.cache = None  # its memory goes back now, not when the slowest micro-batch ends


def _collect(batches: list[_MicroBatch], count: int, eos: list[int]) -> list[torch.Tensor]:
    """Each prompt unpadded + its new tokens up to its first end token, in the caller's order."""
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * count
    ends = torch.tensor(eos, dtype=torch.long) if eos else None
    for batch in batches:
        width = batch.state.width
        for row, (index, length) in enumerate(zip(batch.order, batch.lengths, strict=True)):
            new = batch.sequences[row, width:batch.length].cpu()
            if ends is not None:
                hit = torch.isin(new, ends).nonzero()
                if len(hit):
                    new = new[:int(hit[0]) + 1]
            out[index] = torch.cat([batch.sequences[row, width - length:width].cpu(), new])
    return out
