"""The text side of generation: streaming decoded text as tokens arrive, and stopping on strings.

Streamers follow transformers' protocol (`put(token_ids)` once with the prompt, then once per step, then
`end()`), so `generate` drives ours and theirs alike. Text is released only when it is final: up to the last
space or newline, never in the middle of a multi-byte UTF-8 character (a byte-level BPE token can end half
way through one, which decodes to U+FFFD until the next token completes it).
"""
from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

_INCOMPLETE = "\ufffd"


class TextStreamer:
    """Decode tokens incrementally and hand each final piece of text to `on_text` (default: print it)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False,
                 on_text: Callable[[str], None] | None = None, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._on_text = on_text
        self._tokens: list[int] = []
        self._printed = 0
        self._prompt_next = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer supports a batch of one prompt; got a batch of "
                             f"{value.shape[0]} rows")
        ids = value.reshape(-1).tolist()
        prompt, self._prompt_next = self._prompt_next, False
        if prompt and self.skip_prompt:
            return
        self._tokens.extend(ids)
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        if text.endswith("\n"):  # a line is final: start afresh so decoding stays short
            piece, self._tokens, self._printed = text[self._printed:], [], 0
        else:
            final = text.rstrip(_INCOMPLETE)
            cut = len(final) if final and _is_cjk(final[-1]) else final.rfind(" ") + 1
            piece = final[self._printed:cut] if cut > self._printed else ""
            self._printed += len(piece)
        if piece:
            self.on_finalized_text(piece)

    def end(self) -> None:
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs) if self._tokens else ""
        piece = text[self._printed:]
        self._tokens, self._printed, self._prompt_next = [], 0, True
        self.on_finalized_text(piece, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self._on_text is not None:
            if text:
                self._on_text(text)
            return
        print(text, end="" if not stream_end else "\n", flush=True, file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """A streamer you iterate over from another thread: `for text in streamer: ...` while generate runs."""

    _STOP = object()

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._queue.put(text)
        if stream_end:
            self._queue.put(self._STOP)

    def fail(self, error: BaseException) -> None:
        """Pass an error from the generating thread to the reader, which re-raises it."""
        self._queue.put(error)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self._queue.get(timeout=self.timeout)
        if item is self._STOP:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def stream_generate(model: Any, input_ids: torch.Tensor, tokenizer: Any, **kwargs: Any) -> Iterator[str]:
    """Yield the new text of `model.generate(input_ids, **kwargs)` piece by piece (generation runs in a thread)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def run() -> None:
        try:
            model.generate(input_ids, streamer=streamer, **kwargs)
        except BaseException as err:  # re-raised in the reading thread
            streamer.fail(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


class StopStrings:
    """Stop a row when a stop string appears in its text and overlaps the newest token (transformers' rule).

    Only a short tail of each row is decoded: enough tokens to cover the longest stop string.
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.strings = list(strings)
        self._tail = max(len(s) for s in self.strings) + 2  # a token decodes to at least one character

    def __call__(self, sequences: torch.Tensor, length: int) -> torch.Tensor:
        """Rows of `sequences[:, :length]` whose newest token completes a stop string."""
        hits = []
        for row in sequences[:, max(0, length - self._tail):length].tolist():
            text = self.tokenizer.decode(row)
            before = len(self.tokenizer.decode(row[:-1]))
            hits.append(any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in self.strings))
        return torch.tensor(hits, dtype=torch.bool, device=sequences.device)


def _is_cjk(char: str) -> bool:
    """CJK ideographs are words on their own, so they are final as soon as they are decoded."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                               (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                               (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))
