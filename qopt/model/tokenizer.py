"""`OPTTokenizer`: GPT-2 byte-level BPE with OPT's remapped vocabulary, on the `tokenizers` library.

As OPT does, every encoded text starts with `</s>` (id 2) and padding uses `<pad>` (id 1). The real OPT files
ship in `qopt/data/tokenizer`, so nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ..bundled import BUNDLED, bundled_tokenizer_dir
from ..errors import TokenizerError

_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _raise_for_bad_text(texts: list[str]) -> None:
    """Name the text and character the tokenizers library refused: a non-string or an unpaired surrogate."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i}: expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text {i}: unpaired surrogate U+{ord(text[err.start]):04X} at character {err.start} "
                             f"is not valid Unicode (read such input with errors='replace')") from None


class OPTTokenizer:
    bos_token, eos_token, pad_token, unk_token = "</s>", "</s>", "<pad>", "</s>"

    def __init__(self, tokenizer: Tokenizer, source: Path | None = None) -> None:
        self._tok = tokenizer
        self.source = source
        self.padding_side = "right"
        self.pad_token_id = tokenizer.token_to_id(self.pad_token)
        self.eos_token_id = self.bos_token_id = tokenizer.token_to_id(self.eos_token)
        self.all_special_ids = {self.pad_token_id, self.eos_token_id}
        if self.pad_token_id is None or self.eos_token_id is None:
            raise TokenizerError(f"{source or 'tokenizer'}: not an OPT (GPT-2 byte-level BPE) tokenizer: it has no "
                                 f"'{self.eos_token}' / '{self.pad_token}' token")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> OPTTokenizer:
        """Read `tokenizer.json`, or `vocab.json` + `merges.txt`, from a folder; None = the bundled files."""
        folder = bundled_tokenizer_dir() if path in (None, BUNDLED) else Path(path)
        if (folder / "tokenizer.json").exists():
            try:
                return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), folder)
            except Exception as err:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: unreadable ({err})") from None
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab, merges):
            if not file.exists():
                raise TokenizerError(f"{file}: missing; a tokenizer folder needs tokenizer.json or "
                                     f"vocab.json + merges.txt")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as err:
            raise TokenizerError(f"{folder}: vocab.json / merges.txt unreadable ({err})") from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, normalized=True) for t in ("</s>", "<pad>")])
        return cls(tok, folder)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        try:  # one text skips the library's thread pool (which warns after a fork)
            encoded = [self._tok.encode(texts[0], add_special_tokens=False)] if len(texts) == 1 else \
                self._tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # the library's message ("TextInputSequence must be str") names neither text nor cause
            _raise_for_bad_text(texts)
            raise
        return [([self.bos_token_id] if add_special_tokens else []) + e.ids for e in encoded]

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True, padding_side: str | None = None) -> dict[str, Any]:
        """HF-style batch encoding: {'input_ids', 'attention_mask'}, lists or 'pt' tensors."""
        single = isinstance(text, str)
        ids = self.encode_batch([text] if single else list(text), add_special_tokens)
        if truncation and max_length is not None:
            ids = [seq[:max_length] for seq in ids]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        width = max((len(seq) for seq in ids), default=0)
        if padding == "max_length" and max_length is not None:
            width = max_length
        pad = bool(padding) or return_tensors == "pt" and len(ids) > 1
        masks = [[1] * len(seq) for seq in ids]
        if pad:
            for i, seq in enumerate(ids):
                n = width - len(seq)
                fill, zeros = [self.pad_token_id] * n, [0] * n
                ids[i], masks[i] = (fill + seq, zeros + masks[i]) if side == "left" else (seq + fill, masks[i] + zeros)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        negative = next((i for i, token in enumerate(ids) if token < 0), None)
        if negative is not None:
            raise ValueError(f"token id {ids[negative]} at position {negative} is negative; ids are in "
                             f"[0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def batch_decode(self, batch: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.source is not None and all((self.source / f).exists() for f in _FILES):
            for name in _FILES:
                shutil.copyfile(self.source / name, folder / name)
        else:
            self._tok.save(str(folder / "tokenizer.json"))


def own_tokenizer(model_path: str | os.PathLike) -> OPTTokenizer | None:
    """The checkpoint's own tokenizer files if it has them, else None (every OPT shares the bundled one); a Hub
    id reads them from the HF cache (no network call)."""
    from ..io.hub import cached_folder

    folder = cached_folder(model_path) or Path(model_path)
    has_files = (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()
    return OPTTokenizer.from_pretrained(folder) if has_files else None


def tokenizer_for(model_path: str | os.PathLike) -> OPTTokenizer:
    """The checkpoint's own tokenizer when it has one, else the bundled OPT tokenizer."""
    return own_tokenizer(model_path) or OPTTokenizer.from_pretrained()
