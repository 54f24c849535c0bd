"""Fine-tuning data from text and JSONL files, tokenized once: causal-LM blocks and labelled sequences.

A `.txt` file is one document; a `.jsonl` file holds one JSON object per line with a "text" field (and a
"label" for classification). Causal-LM documents are packed into fixed-length blocks, each document starting
with `</s>` as in OPT's pretraining, so no step wastes compute on padding.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..model.tokenizer import OPTTokenizer


def read_records(path: str | os.PathLike, need_label: bool = False) -> list[dict[str, Any]]:
    """The documents of a .txt (one record) or .jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        if need_label:
            raise ValueError(f"{path}: classification data must be JSONL with 'text' and 'label' fields")
        return [{"text": path.read_text(encoding="utf-8")}]
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string field 'text'")
            if need_label and "label" not in record:
                raise ValueError(f"{path}:{number}: field 'label' is missing")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


class LMBlocks(Dataset):
    """Packed token blocks; the model shifts labels itself, so labels are the inputs."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]

    @staticmethod
    def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(items).long()
        return {"input_ids": ids, "labels": ids}

    def split(self, eval_fraction: float) -> tuple[LMBlocks, LMBlocks]:
        n_eval = _eval_count(len(self), eval_fraction)
        return LMBlocks(self.blocks[:-n_eval]), LMBlocks(self.blocks[-n_eval:])


@dataclass
class LabelledTexts(Dataset):
    """Token sequences with one label each, padded per batch on the right (the head reads the last real token)."""

    ids: list[list[int]]
    labels: list[int]
    pad_token_id: int
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.ids[index], self.labels[index]

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": torch.tensor([label for _, label in items], dtype=torch.long)}

    def split(self, eval_fraction: float) -> tuple[LabelledTexts, LabelledTexts]:
        n = len(self) - _eval_count(len(self), eval_fraction)
        part = lambda s: LabelledTexts(self.ids[s], self.labels[s], self.pad_token_id, self.label_names)  # noqa: E731
        return part(slice(None, n)), part(slice(n, None))


def _eval_count(total: int, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction}")
    n = max(1, round(total * fraction))
    if n >= total:
        raise ValueError(f"{total} examples are too few to hold out {fraction:.0%} for evaluation")
    return n


def lm_dataset(path: str | os.PathLike, tokenizer: OPTTokenizer, block_size: int) -> LMBlocks:
    """Tokenize every document, concatenate and cut into `block_size` blocks (the tail shorter than one is dropped)."""
    texts = [r["text"] for r in read_records(path)]
    ids = [token for seq in tokenizer.encode_batch(texts) for token in seq]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one block of {block_size}; "
                         f"use a smaller block size or more text")
    return LMBlocks(torch.tensor(ids[:n_blocks * block_size], dtype=torch.int32).view(n_blocks, block_size))


def classification_dataset(path: str | os.PathLike, tokenizer: OPTTokenizer, max_length: int,
                           label_names: list[str] | None = None) -> LabelledTexts:
    """Labels may be integers (class ids) or strings (mapped to ids in sorted order, or by `label_names`)."""
    records = read_records(path, need_label=True)
    raw = [r["label"] for r in records]
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        labels = list(raw)
        names = label_names or [str(i) for i in range(max(labels) + 1)]
    elif all(isinstance(x, str) for x in raw):
        names = label_names or sorted(set(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not among {names}")
        labels = [names.index(x) for x in raw]
    else:
        raise ValueError(f"{path}: field 'label' must be all integers or all strings")
    if min(labels) < 0:
        raise ValueError(f"{path}: label ids must be >= 0, got {min(labels)}")
    ids = [seq[:max_length] for seq in tokenizer.encode_batch([r["text"] for r in records])]
    return LabelledTexts(ids, labels, tokenizer.pad_token_id, names)
