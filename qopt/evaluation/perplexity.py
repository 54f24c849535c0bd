"""WikiText-2 perplexity under the GPTQ protocol, with KL divergence and top-1 agreement against a reference.

The text is the test split's rows joined with "\\n\\n" as the HF dataset and GPTQ do (287,645 tokens with the
leading `</s>`; other joins give 290,579 or 286,222, so published perplexities would not compare); it is cut
into non-overlapping windows of `seqlen` tokens and the trailing partial window is dropped. With a `stride`
below `seqlen` the windows overlap as in the HF perplexity guide and each token is scored once, with at least
`seqlen - stride` tokens of context. The negative log-likelihood is computed here from the logits in fp32, so
any model callable as `model(input_ids)` that returns `.logits` (qopt's or transformers') is measured alike.
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundled import wikitext2_test_path
from ..model.network import input_device
from ..model.tokenizer import OPTTokenizer
from ..place.sizes import LOGIT_CHUNK_ROWS

WIKITEXT_JOIN = "\n\n"


def wikitext_join(raw: str) -> str:
    """The rows of a raw WikiText file (lines with their newline; blank lines empty) joined with "\\n\\n"."""
    rows = ["" if line.strip() == "" else line for line in raw.splitlines(keepends=True)]
    return WIKITEXT_JOIN.join(rows)


def wikitext2_text(path: str | Path | None = None) -> str:
    """The evaluation text: the bundled WikiText-2 raw test split unless another raw file is given."""
    return wikitext_join(Path(path or wikitext2_test_path()).read_text(encoding="utf-8"))


def tokenize(text: str, tokenizer: Any = None) -> torch.Tensor:
    """1-D token ids of `text`; the tokenizer (qopt's or transformers') prepends `</s>` as OPT does."""
    if tokenizer is None:
        tokenizer = OPTTokenizer.from_pretrained()
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _bundled_ids() -> torch.Tensor:
    return tokenize(wikitext2_text())


def text_ids(text: str | None = None, tokenizer: Any = None) -> torch.Tensor:
    """Token ids of `text` (default: WikiText-2 test); the bundled pair is tokenized once per process."""
    if text is None and tokenizer is None:
        return _bundled_ids()
    return tokenize(wikitext2_text() if text is None else text, tokenizer)


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; labels at window positions >= `score_from` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.begin - self.score_from


def cut_windows(n_tokens: int, seqlen: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    """Full windows only (GPTQ drops the trailing partial one); the first window scores every label.

    Position 0 of a window has no prediction, so `score_from` is at least 1: with stride == seqlen each
    window scores seqlen - 1 tokens, exactly the GPTQ count.
    """
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise ValueError(f"seqlen {seqlen}: a window needs at least 2 tokens")
    if not 1 <= stride <= seqlen:
        raise ValueError(f"stride {stride}: expected 1 <= stride <= seqlen ({seqlen})")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows {max_windows}: expected at least 1")
    if n_tokens < seqlen:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of seqlen {seqlen}")
    windows = []
    for begin in range(0, n_tokens - seqlen + 1, stride):
        if max_windows is not None and len(windows) == max_windows:
            break
        windows.append(Window(begin, begin + seqlen, 1 if begin == 0 else max(1, seqlen - stride)))
    return windows


def _windows(n: int) -> str:
    return f"{n} window" + ("" if n == 1 else "s")


@dataclass
class PerplexityResult:
    """Token perplexity = exp(nll), nll = mean negative log-likelihood (nats) over the scored tokens.

    `seconds` is the time spent in the measured model's forward passes (not the reference's, not scoring);
    `kl` (reference || model, nats per token) and `top1` (argmax agreement) are set when a reference ran;
    `streaming` is set for a layer-major run (`qopt.evaluation.streamed`): bytes read, hidden-state budget.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    total_tokens: int
    seqlen: int
    stride: int
    kl: float | None = None
    top1: float | None = None
    streaming: dict[str, Any] | None = None

    def summary(self) -> str:
        line = (f"perplexity {self.ppl:.4f} (nll {self.nll:.5f}) over {self.tokens:,} scored tokens, "
                f"{_windows(self.windows)} of {self.seqlen}")
        if self.stride != self.seqlen:
            line += f", stride {self.stride}"
        line += f", {self.seconds:.1f} s"
        if self.kl is not None:
            line += f"; KL {self.kl:.5f}, top-1 agreement {self.top1:.2%}"
        if self.streaming:
            from ..loading.layer_runner import describe_budget

            line += (f"; layer-major, {self.streaming['bytes_read'] / 2**20:,.1f} MiB read from disk, "
                     f"{describe_budget(self.streaming)}")
        return line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Totals:
    """Sums in float64 over windows; the means are taken once at the end."""

    nll: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    count: int = 0

    def add_window(self, logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        """Score positions whose next token is a label: logits (L-1, V) predict labels (L-1,)."""
        for start in range(0, labels.shape[0], LOGIT_CHUNK_ROWS):
            part = slice(start, start + LOGIT_CHUNK_ROWS)
            logp = F.log_softmax(logits[part].float(), dim=-1)
            target = labels[part].to(logp.device)
            self.nll -= logp.gather(-1, target[:, None]).double().sum().item()
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits[part].to(logp.device).float(), dim=-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # >= 0 but for fp32 rounding (~1e-8)
                self.kl += kl.clamp_min(0).double().sum().item()
                self.top1 += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            self.count += target.shape[0]

    def result(self, windows: int, seconds: float, total_tokens: int, seqlen: int, stride: int | None,
               compared: bool, **extra: Any) -> PerplexityResult:
        """The means, once, as the result both the window-major and the layer-major loops return."""
        nll = self.nll / self.count
        return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=self.count, windows=windows, seconds=seconds,
                                total_tokens=total_tokens, seqlen=seqlen, stride=seqlen if stride is None else stride,
                                kl=self.kl / self.count if compared else None,
                                top1=self.top1 / self.count if compared else None, **extra)


def _forward_fn(model: Callable[..., Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of one (1, L) window; use_cache=False where the model takes it (no KV cache is needed)."""
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
        takes_cache_flag = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_cache_flag = False
    kwargs = {"use_cache": False} if takes_cache_flag else {}

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    return forward


def _check_seqlen(model: Any, seqlen: int | None) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seqlen is None:
        if limit is None:
            raise ValueError("seqlen: the model has no config.max_position_embeddings; pass seqlen")
        return int(limit)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings ({limit})")
    return seqlen


@torch.no_grad()
def evaluate_ids(model: Any, ids: torch.Tensor, seqlen: int | None = None, stride: int | None = None,
                 max_windows: int | None = None, progress: bool = True, reference: Any = None,
                 desc: str = "Perplexity", streamed: bool | None = None, **stream_options: Any) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token tensor; with `reference`, also KL and top-1 agreement.

    A qopt model with decoder layers on disk runs layer-major (`streamed=None`, the default; see
    `qopt.evaluation.streamed`, which takes `stream_options`): each offloaded layer is read once, not once per
    window. `streamed=False` forces the window-major loop, `True` layer-major for any qopt model.

    Both models see the same window one after the other, so no logits are held beyond one window. Models are
    put in eval mode (quantized layers take their inference path) and given back in the mode they came in.
    no_grad rather than inference_mode: bitsandbytes repacks 4-bit weights at the first eval forward, and an
    inference tensor there would break a later fine-tune of the same model.
    """
    seqlen = _check_seqlen(model, seqlen)
    windows = cut_windows(int(ids.numel()), seqlen, stride, max_windows)
    models = [m for m in (model, reference) if m is not None]
    was_training = [bool(getattr(m, "training", False)) for m in models]
    for m in models:
        if hasattr(m, "eval"):
            m.eval()
    if streamed is None:
        from ..loading.layer_runner import has_offloaded_layers

        streamed = has_offloaded_layers(model)
    if streamed:
        from .streamed import evaluate_streamed

        try:
            return evaluate_streamed(model, ids, windows, seqlen, stride, reference, progress, desc,
                                     **stream_options)
        finally:
            for m, mode in zip(models, was_training, strict=True):
                if hasattr(m, "train"):
                    m.train(mode)
    forward, ref_forward = _forward_fn(model), _forward_fn(reference) if reference is not None else None
    device, ref_device = input_device(model), input_device(reference) if reference is not None else None
    totals, seconds = _Totals(), 0.0
    bar = tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False)
    try:
        for window in bar:
            chunk = ids[window.begin:window.end][None]
            labels = chunk[0, window.score_from:]
            began = time.perf_counter()
            logits = forward(chunk.to(device))[0, window.score_from - 1:-1]
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)  # kernels run asynchronously; time them to the end
            seconds += time.perf_counter() - began
            ref_logits = None
            if ref_forward is not None:
                ref_logits = ref_forward(chunk.to(ref_device))[0, window.score_from - 1:-1]
            totals.add_window(logits, labels, ref_logits)
            if progress:
                bar.set_postfix(ppl=f"{math.exp(totals.nll / totals.count):.3f}", refresh=False)
    finally:
        bar.close()
        for m, mode in zip(models, was_training, strict=True):
            if hasattr(m, "train"):
                m.train(mode)
    return totals.result(len(windows), seconds, int(ids.numel()), seqlen, stride, reference is not None)


def describe_windows(total_tokens: int, seqlen: int, stride: int | None = None,
                     max_windows: int | None = None) -> str:
    """The one line `qopt eval` prints before measuring: token and window counts of the protocol."""
    windows = cut_windows(total_tokens, seqlen, stride, max_windows)
    scored = sum(w.scored for w in windows)
    mode = "GPTQ protocol" if stride in (None, seqlen) else f"sliding windows, stride {stride}"
    prefix = f" (first {len(windows)} only)" if max_windows is not None else ""
    return (f"WikiText-2 test: {total_tokens:,} tokens; {_windows(len(windows))} of {seqlen}{prefix}, "
            f"{scored:,} scored tokens ({mode})")


def evaluate_perplexity(model: Any, tokenizer: Any = None, text: str | None = None, seqlen: int | None = None,
                        stride: int | None = None, max_windows: int | None = None, progress: bool = True,
                        reference: Any = None, streamed: bool | None = None, **stream_options: Any
                        ) -> PerplexityResult:
    """WikiText-2 test perplexity of `model` (GPTQ protocol; `seqlen` defaults to max_position_embeddings).

    `text` replaces the WikiText-2 test text; `tokenizer` defaults to the bundled OPT tokenizer; `max_windows`
    keeps a prefix of the windows; `reference` (a model) adds KL(reference || model) and top-1 agreement.
    With decoder layers on disk the run is layer-major (`streamed`, `stream_options`: see `evaluate_ids`).
    """
    ids = text_ids(text, tokenizer)
    seqlen = _check_seqlen(model, seqlen)
    if progress:
        tqdm.write(describe_windows(int(ids.numel()), seqlen, stride, max_windows))
    return evaluate_ids(model, ids, seqlen, stride, max_windows, progress, reference, streamed=streamed,
                        **stream_options)
