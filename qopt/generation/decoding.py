"""Decoding strategies written against the model's forward and the preallocated KV cache.

`generate(model, input_ids, ...)` takes transformers' argument names and follows its semantics: greedy search,
multinomial sampling (temperature, top-k, top-p), repetition penalty, beam search and beam sampling, contrastive
search (Su et al., 2022), end tokens, stop strings and streaming. It returns prompt + new tokens, rows that finished
early padded with `pad_token_id`. As in gpt-fast, `DecodeState.prefill` runs the prompts once (the KV cache sized
for prompt + max_new_tokens, each layer's buffer on that layer's device) and `DecodeState.decode_one_token` feeds
one token per row; each strategy is a short loop over the two. `qopt.generation.lean_forwards` trims the
per-token overhead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenerationError
from ..model.cache import KVCache
from ..model.network import input_device
from .lean_forwards import decode_fast_paths
from .streamers import StopStrings, TextStreamer

DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is given
_NEG = -1.0e9  # transformers' "never pick this beam" score


@dataclass
class GenerationConfig:
    """The options of `generate`, with transformers' names and defaults (top_k=50 applies when sampling)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    penalty_alpha: float | None = None
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    seed: int | None = None
    use_cache: bool = True

    @property
    def mode(self) -> str:
        if self.num_beams > 1:
            return "beam"
        if self.do_sample:
            return "sample"
        return "contrastive" if self.penalty_alpha and self.top_k > 1 else "greedy"

    def validate(self) -> None:
        def count(value: Any, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        checks = [
            ("max_new_tokens", self.max_new_tokens is None or count(self.max_new_tokens, 0), "an integer >= 0"),
            ("max_length", self.max_length is None or count(self.max_length, 0), "an integer >= 0"),
            ("temperature", not self.do_sample or self.temperature > 0, "a number > 0 when sampling"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", count(self.top_k, 0), "an integer >= 0 (0 turns top-k off)"),
            ("num_beams", count(self.num_beams, 1), "an integer >= 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1.0 = no penalty)"),
            ("num_return_sequences", count(self.num_return_sequences, 1), "an integer >= 1"),
            ("early_stopping", self.early_stopping in (True, False, "never"), "True, False or 'never'"),
            ("penalty_alpha", self.penalty_alpha is None or 0 <= self.penalty_alpha <= 1, "a number in [0, 1]"),
            ("seed", self.seed is None or count(self.seed, 0), "an integer >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise GenerationError(f"generate(): {name}={getattr(self, name)!r}; expected {expected}")
        if self.num_return_sequences > 1 and self.mode in ("greedy", "contrastive"):
            raise GenerationError(f"generate(): num_return_sequences={self.num_return_sequences} needs sampling "
                                  "(do_sample=True) or beam search (num_beams >= num_return_sequences)")
        if self.mode == "beam" and not self.do_sample and self.num_return_sequences > self.num_beams:
            raise GenerationError(f"generate(): num_return_sequences={self.num_return_sequences} is more than "
                                  f"num_beams={self.num_beams}")


class DecodeState:
    """The model side of one generate call: KV cache, attention mask and positions of every row."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor, max_new_tokens: int, use_cache: bool) -> None:
        rows, width = attention_mask.shape
        self.model = model
        self.width = width
        self.padded = bool((attention_mask == 0).any())
        self.mask = attention_mask.new_ones(rows, width + max_new_tokens)
        self.mask[:, :width] = attention_mask
        self.attended = attention_mask.sum(1, keepdim=True)
        self.prompt_start = (attention_mask != 0).int().argmax(1, keepdim=True)  # first non-padding token
        on_cpu = all(p.device.type in ("cpu", "meta") for p in model.parameters())  # meta: offloaded to disk
        self.cache = KVCache(model.config.num_hidden_layers, width + max_new_tokens,
                             torch.float32 if on_cpu else None) if use_cache else None  # see KVCache's dtype

    def prefill(self, sequences: torch.Tensor, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the prompts once, filling the cache: fp32 logits for the first new token (and last hidden states)."""
        return self._run(sequences[:, :self.width], self.width, None, hidden)

    def decode_one_token(self, sequences: torch.Tensor, length: int, hidden: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed each row's newest token, `sequences[:, length - 1]` (without a cache: all tokens again)."""
        if self.cache is None:
            return self._run(sequences[:, :length], length, None, hidden)
        positions = self.attended + (length - 1 - self.width)  # positions count attended tokens only
        return self._run(sequences[:, length - 1:length], length, positions, hidden)

    def _run(self, ids: torch.Tensor, length: int, positions: torch.Tensor | None, hidden: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :length] if self.padded else None,
                         position_ids=positions, past_key_values=self.cache, use_cache=self.cache is not None,
                         logits_to_keep=1, output_hidden_states=hidden)
        logits = out.logits[:, -1].to(ids.device, torch.float32)
        return logits, (out.hidden_states[-1].to(ids.device) if hidden else None)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep, repeat or permute rows (beam search, contrastive candidates)."""
        self.mask, self.attended, self.prompt_start = (t.index_select(0, index.to(t.device))
                                                       for t in (self.mask, self.attended, self.prompt_start))
        if self.cache is not None:
            self.cache.reorder(index)


class _Rows:
    """Which rows still generate: end tokens, stop strings, padding of finished rows, and the streamer."""

    def __init__(self, rows: int, device: torch.device, eos: list[int], pad: int | None,
                 stops: StopStrings | None, streamer: Any) -> None:
        self.eos = torch.tensor(eos, device=device) if eos else None
        self.stops = stops
        self.stoppable = self.eos is not None or stops is not None
        self.pad = pad
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.streamer = streamer

    def hits(self, sequences: torch.Tensor, length: int) -> torch.Tensor:
        """Rows of `sequences[:, :length]` whose newest token ends them."""
        hit = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        if self.eos is not None:
            hit |= torch.isin(sequences[:, length - 1], self.eos)
        if self.stops is not None:
            hit |= self.stops(sequences, length)
        return hit

    def push(self, sequences: torch.Tensor, length: int, tokens: torch.Tensor) -> bool:
        """Write the step's tokens at `length`; True when every row has finished."""
        if self.stoppable and self.pad is not None:
            tokens = torch.where(self.unfinished, tokens, self.pad)
        sequences[:, length] = tokens
        stream(self.streamer, tokens)
        if not self.stoppable:
            return False
        self.unfinished &= ~self.hits(sequences, length + 1)
        return not bool(self.unfinished.any())


def stream(streamer: Any, tokens: torch.Tensor) -> None:
    """transformers' streamer protocol (`put`), or a plain callable that receives each step's tokens."""
    if streamer is None:
        return
    (streamer.put if hasattr(streamer, "put") else streamer)(tokens.cpu())


def process_scores(scores: torch.Tensor, sequences: torch.Tensor, length: int, state: DecodeState,
                   config: GenerationConfig, warp: bool, min_keep: int = 1) -> torch.Tensor:
    """transformers' order: repetition penalty, then (sampling only) temperature, top-k and top-p."""
    vocab = scores.shape[-1]
    if config.repetition_penalty != 1.0:  # over the prompt (left padding excluded) and the new tokens
        ids = sequences[:, :length]
        before_prompt = torch.arange(length, device=ids.device)[None] < state.prompt_start.to(ids.device)
        ids = ids.masked_fill(before_prompt, vocab).clamp(max=vocab)
        seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
        penalty = config.repetition_penalty
        scores = torch.where(seen[:, :vocab], torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if not warp:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k:
        k = min(max(config.top_k, min_keep), vocab)
        scores = scores.masked_fill(scores < scores.topk(k)[0][..., -1:], float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - config.top_p
        drop[..., -min_keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def greedy_or_sample(state: DecodeState, sequences: torch.Tensor, end: int, config: GenerationConfig,
                     rows: _Rows, generator: torch.Generator | None) -> int:
    """Greedy search or multinomial sampling; returns the final length."""
    logits, _ = state.prefill(sequences)
    length = state.width
    while True:
        scores = process_scores(logits, sequences, length, state, config, warp=config.do_sample)
        if config.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        done = rows.push(sequences, length, tokens)
        length += 1
        if done or length == end:
            return length
        logits, _ = state.decode_one_token(sequences, length)


def contrastive_search(state: DecodeState, sequences: torch.Tensor, end: int, config: GenerationConfig,
                       rows: _Rows) -> int:
    """Su et al. (2022): among the top-k tokens pick argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j).

    h are the model's last hidden states (after the final layer norm); j runs over the attended context.
    Each step feeds the k candidates of every row as one batch and keeps the chosen row's cache.
    """
    k, alpha, length = config.top_k, float(config.penalty_alpha), state.width
    batch = sequences.shape[0]
    first = torch.arange(batch, device=sequences.device)
    logits, context = state.prefill(sequences, hidden=True)
    context = F.normalize(context.float(), dim=-1)
    while length < end:
        scores = process_scores(logits, sequences, length, state, config, warp=False)
        top_probs, top_ids = scores.softmax(-1).topk(k, dim=-1)
        expand = first.repeat_interleave(k)
        state.reorder(expand)
        candidates = sequences.index_select(0, expand)
        candidates[:, length] = top_ids.reshape(-1)
        cand_logits, cand_hidden = state.decode_one_token(candidates, length + 1, hidden=True)
        cand_hidden = F.normalize(cand_hidden[:, -1:].float(), dim=-1)
        cosine = (context.repeat_interleave(k, 0) @ cand_hidden.transpose(1, 2)).squeeze(-1)
        cosine = cosine.masked_fill(state.mask[:, :length].to(cosine.device) == 0, float("-inf"))
        score = (1 - alpha) * top_probs.reshape(-1) - alpha * cosine.max(-1).values
        chosen = first * k + score.view(batch, k).argmax(-1)
        state.reorder(chosen)
        done = rows.push(sequences, length, top_ids.reshape(-1)[chosen])
        length += 1
        logits, context = cand_logits[chosen], torch.cat([context, cand_hidden[chosen]], 1)
        if done:
            break
    return length


def beam_search(state: DecodeState, prompt: torch.Tensor, end: int, config: GenerationConfig, rows: _Rows,
                generator: torch.Generator | None) -> torch.Tensor:
    """transformers' vectorised beam search (and beam sampling), step for step, so outputs match token for token.

    Each step keeps the top (1 + number of end tokens) x num_beams continuations, so at least num_beams stay
    running when the best ones finish; finished hypotheses are scored with length ** length_penalty.
    """
    beams, width, device = config.num_beams, state.width, prompt.device
    batch = prompt.shape[0] // beams
    n_eos = 0 if rows.eos is None else rows.eos.numel()
    keep = max(2, 1 + n_eos) * beams
    in_top = torch.arange(keep, device=device) < beams
    fill = rows.pad if rows.pad is not None else (int(rows.eos[0]) if n_eos else -1)
    running = torch.full((batch, beams, end), fill, dtype=torch.long, device=device)
    running[:, :, :width] = prompt.view(batch, beams, width)
    done_seqs = running.clone()
    run_scores = torch.zeros(batch, beams, device=device)
    run_scores[:, 1:] = _NEG  # only the first beam's tokens at step one, or all beams would pick the same
    done_scores = torch.full((batch, beams), _NEG, device=device)
    finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    run_origin = torch.full((batch, beams, end - width), -1, dtype=torch.long, device=device)
    done_origin = run_origin.clone()
    offsets = torch.arange(batch, device=device)[:, None] * beams
    length = width
    logits, _ = state.prefill(prompt)
    while True:
        flat = running[:, :, :length].reshape(batch * beams, length)
        log_probs = process_scores(logits.log_softmax(-1), flat, length, state, config, config.do_sample, n_eos + 1)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + run_scores[:, :, None]).view(batch, beams * vocab)
        if config.do_sample:
            picked = torch.multinomial(total.softmax(-1), keep, generator=generator)
            top_scores, order = total.gather(1, picked).sort(-1, descending=True)
            picked = picked.gather(1, order)
        else:
            top_scores, picked = total.topk(keep)
        source = picked // vocab
        top_seqs = _gather(running, source)
        top_seqs[:, :, length] = picked % vocab
        top_origin = _gather(run_origin, source)
        top_origin[:, :, length - width] = source + offsets
        hits = (length + 1 >= end) | rows.hits(top_seqs[:, :, :length + 1].reshape(batch * keep, -1),
                                                 length + 1).view(batch, keep)
        # the best unfinished continuations keep running
        run_candidates = top_scores + hits.float() * _NEG
        best = run_candidates.topk(beams)[1]
        running, run_scores, run_origin = (_gather(t, best) for t in (top_seqs, run_candidates, top_origin))
        # finished continuations among the top num_beams join the finished set if they score better
        just_finished = hits & in_top[None, :]
        scored = top_scores / ((length + 1 - width) ** config.length_penalty)
        full = finished.all(-1, keepdim=True) & (config.early_stopping is True)
        scored = scored + full.float() * _NEG
        scored = scored + (~improvable).float() * _NEG
        scored = scored + (~just_finished) * _NEG
        merged = [torch.cat(pair, 1) for pair in ((done_seqs, top_seqs), (done_scores, scored),
                                                  (done_origin, top_origin), (finished, just_finished))]
        best = merged[1].topk(beams)[1]
        done_seqs, done_scores, done_origin, finished = (_gather(t, best) for t in merged)
        state.reorder(run_origin[:, :, length - width].reshape(-1))
        length += 1
        improvable = _may_improve(improvable, run_scores, done_scores, finished, length, end, width, config)
        stop_all = finished.all() & (config.early_stopping is True)
        if not bool(improvable.any() & ~stop_all & ~hits.all()):
            break
        logits, _ = state.decode_one_token(running[:, :, :length].reshape(batch * beams, length), length)
    n = config.num_return_sequences
    done_seqs = done_seqs[:, :n].reshape(batch * n, end)
    generated = int((done_origin[:, :n] >= 0).sum(-1).max())
    return done_seqs[:, :width + generated]


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick beams along dim 1 of a (batch, beams, ...) tensor."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _may_improve(improvable: torch.Tensor, run_scores: torch.Tensor, done_scores: torch.Tensor,
                 finished: torch.Tensor, length: int, end: int, width: int, config: GenerationConfig
                 ) -> torch.Tensor:
    """transformers' early-stop heuristic: can the best running beam still beat the worst finished one?"""
    penalty = config.length_penalty
    best_length = end - width if config.early_stopping == "never" and penalty > 0.0 else length - width
    best_running = run_scores[:, :1] / (best_length ** penalty)
    worst_done = torch.where(finished, done_scores.min(dim=1, keepdim=True)[0], _NEG)
    return improvable & (best_running > worst_done).any(-1, keepdim=True)


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             tokenizer: Any = None, streamer: Any = None, **kwargs: Any) -> torch.LongTensor:
    """Continue each prompt row; returns prompt + new tokens (batch * num_return_sequences, length).

    Arguments are transformers' (see `GenerationConfig`): prompts of different lengths are left-padded with
    `attention_mask` 0. Without max_new_tokens / max_length, 20 new tokens (capped at the model's positions). A
    prompt + max_new_tokens longer than `max_position_embeddings` is an error naming both numbers (no silent
    truncation). `eos_token_id` defaults to the config's; an empty list never stops early. `stop_strings`
    needs `tokenizer=`. `seed` makes sampling reproducible without touching torch's global generator.
    `streamer` is a `TextStreamer`-like object (put/end) or a callable given each step's new tokens.
    """
    try:
        config = GenerationConfig(**kwargs)
    except TypeError as err:
        raise GenerationError(f"generate(): {err}".replace("GenerationConfig.__init__()", "")) from None
    config.validate()
    eos = _as_list(config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    pad = eos[0] if pad is None and eos else pad
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask, pad, eos)
    new_tokens = _new_token_count(config, attention_mask, model.config.max_position_embeddings)
    stops = None
    if config.stop_strings:
        if tokenizer is None:
            raise GenerationError("generate(): stop_strings need the tokenizer; pass tokenizer=...")
        stops = StopStrings(tokenizer, [config.stop_strings] if isinstance(config.stop_strings, str)
                            else config.stop_strings)
    if streamer is not None and config.mode == "beam":
        raise GenerationError("generate(): streaming needs num_beams=1 (beams change earlier tokens)")
    if new_tokens == 0:
        return input_ids.repeat_interleave(config.num_return_sequences, 0)
    expand = max(config.num_beams, config.num_return_sequences)
    device = input_device(model, input_ids.device)
    prompt = input_ids.to(device).repeat_interleave(expand, 0)
    attention_mask = attention_mask.to(device).repeat_interleave(expand, 0)
    rows, width = prompt.shape
    end = width + new_tokens
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    finish = _Rows(rows, device, eos, pad, stops, streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(prompt.cpu())
    with torch.no_grad(), decode_fast_paths(model, new_tokens):
        state = DecodeState(model, attention_mask, new_tokens, config.use_cache)
        if config.mode == "beam":
            out = beam_search(state, prompt, end, config, finish, generator)
        else:
            sequences = prompt.new_full((rows, end), pad if pad is not None else 0)
            sequences[:, :width] = prompt
            if config.mode == "contrastive":
                length = contrastive_search(state, sequences, end, config, finish)
            else:
                length = greedy_or_sample(state, sequences, end, config, finish, generator)
            out = sequences[:, :length]
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return out.to(input_ids.device)


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _check_prompt(input_ids: Any, attention_mask: torch.Tensor | None, pad: int | None, eos: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"generate(): input_ids must be a 2-D tensor of token ids (batch, tokens), "
                              f"got {shape}")
    if input_ids.shape[1] == 0:
        raise GenerationError("generate(): the prompt has no tokens; OPT prompts start with </s> (id 2), which "
                              "the tokenizer adds, so encode the text with the tokenizer (or start from [[2]])")
    if attention_mask is None:  # transformers' rule: padding tokens in the prompt are masked out
        has_pad = pad is not None and pad not in eos and bool((input_ids == pad).any())
        attention_mask = (input_ids != pad).long() if has_pad else torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(f"generate(): attention_mask has shape {list(attention_mask.shape)}, input_ids "
                              f"{list(input_ids.shape)}; they must match")
    empty = (attention_mask.sum(1) == 0).nonzero()
    if len(empty):
        raise GenerationError(f"generate(): row {int(empty[0])} of attention_mask is all zeros (an empty prompt); "
                              "OPT prompts start with </s>, which the tokenizer adds")
    return input_ids.long(), attention_mask.long()


def _new_token_count(config: GenerationConfig, attention_mask: torch.Tensor, limit: int) -> int:
    longest = int(attention_mask.sum(1).max())
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif config.max_length is not None:
        new = max(0, config.max_length - attention_mask.shape[1])
    else:
        return max(0, min(DEFAULT_NEW_TOKENS, limit - longest))
    if longest + new > limit:
        raise GenerationError(f"generate(): a prompt of {longest} tokens + {new} new tokens = {longest + new} "
                              f"positions, more than the model's max_position_embeddings={limit}; shorten the "
                              "prompt or ask for fewer tokens")
    return new


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, on_text: Callable[[str], None] | None = None,
                  **kwargs: Any) -> list[str]:
    """Complete a text prompt; returns the new text of each returned sequence, `on_text` gets it as it comes."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    streamer = TextStreamer(tokenizer, skip_prompt=True, on_text=on_text, skip_special_tokens=True) \
        if on_text is not None else None
    out = generate(model, ids, tokenizer=tokenizer, streamer=streamer, **kwargs)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
