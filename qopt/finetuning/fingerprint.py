"""What makes two fine-tuning runs the same run: a checkpoint is resumed only under the same fingerprint.

A resumed run continues the saved optimizer, schedule and data position, so it reproduces an uninterrupted run
only if everything that shapes the losses is unchanged: the data bytes (sha256), the LoRA settings, the
training settings that change results, and the base model (its folder name and config.json). Settings that only
change what is logged or how often (max_steps, save/eval steps, progress) are left out: raising max_steps
extends a finished run. The fingerprint is stored in the checkpoint's trainer_state.json.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..io.hub import cached_folder
from .lora import LoraConfig

# TrainingArguments fields that change the trained weights.
RESULT_SETTINGS = ("learning_rate", "lr_scheduler", "warmup_steps", "optimizer", "weight_decay", "max_grad_norm",
                   "bf16", "fp16", "seed", "batch_size", "gradient_accumulation_steps")
# LoraConfig fields that change the adapter (task_type and base_model_name_or_path follow from the model).
LORA_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora",
                 "init_lora_weights")
SECTIONS = ("base", "data", "lora", "training")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(**files: str | os.PathLike | None) -> dict[str, Any]:
    """role -> {"file", "sha256"} (None for a role without a file): train=..., eval=..."""
    return {role: None if path is None else {"file": Path(path).name, "sha256": file_sha256(path)}
            for role, path in files.items()}


def base_fingerprint(name_or_path: str | os.PathLike | None, config: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The base model's folder name, resolved path and config.json (or `config` for a model built in memory)."""
    if name_or_path is None:
        return {"name": None, "path": None, "config": config}
    path = cached_folder(name_or_path) or Path(name_or_path)  # a Hub id: its snapshot (a new commit is a new base)
    file = path / "config.json"
    if file.is_file():
        config = json.loads(file.read_text(encoding="utf-8"))
    return {"name": path.resolve().name, "path": str(path.resolve()), "config": config}


def run_fingerprint(base: dict[str, Any], lora: LoraConfig, args: Any, data: dict[str, Any] | None = None,
                    settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of a run; `settings` adds the recipe's own (task, block size, quantization, ...)."""
    lora_dict = asdict(lora)
    training = {name: getattr(args, name) for name in RESULT_SETTINGS}
    training.update(settings or {})
    return {"base": base, "data": data, "lora": {name: _plain(lora_dict[name]) for name in LORA_SETTINGS},
            "training": {name: _plain(value) for name, value in training.items()}}


def _plain(value: Any) -> Any:
    """JSON-stable values: lists sorted where order means nothing, dtypes as text."""
    if isinstance(value, (list, tuple, set)):
        return sorted(map(str, value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value).removeprefix("torch.")


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed, one short phrase each ("lora r 8 -> 16"); sections or keys one side lacks (a fingerprint
    written by another version, or a run started through `train` without data files) are not compared."""
    changes: list[str] = []
    for section in SECTIONS:
        old, new = saved.get(section), current.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        if section == "base":
            changes += _base_changes(old, new)
        elif section == "data":
            changes += _data_changes(old, new)
        else:
            prefix = "lora " if section == "lora" else ""
            changes += [f"{prefix}{key} {_show(old[key])} -> {_show(new[key])}"
                        for key in old if key in new and old[key] != new[key]]
    return changes


def _base_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The folder name and config decide; a model folder that was only moved is the same base."""
    if old.get("name") != new.get("name"):
        return [f"base model {_show(old.get('name'))} -> {_show(new.get('name'))}"]
    a, b = old.get("config") or {}, new.get("config") or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    changes = [f"base model config {k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in keys[:3]]
    if len(keys) > 3:
        changes.append(f"base model config: {len(keys) - 3} more fields")
    return changes


def _data_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for role, a in old.items():
        b = new.get(role, a)
        if a == b or (a and b and a["sha256"] == b["sha256"]):
            continue  # the same bytes under another name are the same data
        label = "data file" if role == "train" else f"{role} data file"
        if a is None or b is None:
            changes.append(f"{label} {_show(a and a['file'])} -> {_show(b and b['file'])}")
        elif a["file"] == b["file"]:
            changes.append(f"{label} {a['file']} changed (sha256 {a['sha256'][:12]}... -> {b['sha256'][:12]}...)")
        else:
            changes.append(f"{label} {a['file']} -> {b['file']} (sha256 {a['sha256'][:12]}... -> "
                           f"{b['sha256'][:12]}...)")
    return changes
