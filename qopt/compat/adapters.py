"""What PEFT expects of an adapter folder (`qopt check DIR --for peft`), from the JSON and the header alone.

PEFT 0.21.2's `PeftModel.from_pretrained(model, DIR)` reads `adapter_config.json` and
`adapter_model.safetensors` (or `.bin`), strips `base_model.model.` from each key and loads the rest into the
LoRA layers it injected from the config: a key with an adapter name inside, a lora_A without its lora_B or a
rank that disagrees with `r` leaves a layer at its initial values or fails on a shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..finetuning.adapters import PEFT_PREFIX
from ..io.checkpoint import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BIN_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    read_safetensors_header,
)
from ..model.config import CONFIG_NAME
from .models import CheckReport, Finding

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _config(folder: Path) -> tuple[dict[str, Any] | None, Finding]:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        hint = " (a model folder: check it --for vllm or transformers)" if (folder / CONFIG_NAME).is_file() else ""
        return None, Finding("adapter-config", False, f"{file} is missing: not an adapter folder{hint}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, Finding("adapter-config", False, f"{file}: not valid JSON ({err})")
    if not isinstance(data, dict):
        return None, Finding("adapter-config", False, f"{file}: expected a JSON object")
    if data.get("peft_type") != "LORA":
        return None, Finding("adapter-config", False, f"peft_type is {data.get('peft_type')!r}, expected 'LORA'")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if data.get(k) in (None, "", [])]
    if missing:
        return None, Finding("adapter-config", False, f"{ADAPTER_CONFIG}: field '{missing[0]}' is missing")
    if not isinstance(data["r"], int) or isinstance(data["r"], bool) or data["r"] < 1:
        return None, Finding("adapter-config", False, f"{ADAPTER_CONFIG}: r is {data['r']!r}, expected a positive "
                                                      f"integer")
    return data, Finding("adapter-config", True, f"LoRA r={data['r']}, alpha={data['lora_alpha']}, targets "
                                                 f"{data['target_modules']}")


def _weights(folder: Path) -> tuple[dict[str, Any] | None, Finding]:
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        if (folder / ADAPTER_BIN).is_file():
            return None, Finding("adapter-weights", True, f"{ADAPTER_BIN} (pickle; keys not checked)")
        return None, Finding("adapter-weights", False, f"{file} is missing")
    try:
        tensors, _ = read_safetensors_header(file)
    except CheckpointError as err:
        return None, Finding("adapter-weights", False, str(err))
    return tensors, Finding("adapter-weights", True, f"{ADAPTER_WEIGHTS}, {len(tensors)} tensors")


def _keys(tensors: dict[str, Any], config: dict[str, Any]) -> Finding:
    r, saved = config["r"], set(config.get("modules_to_save") or [])
    rank_pattern = config.get("rank_pattern") or {}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            return Finding("adapter-keys", False, f"tensor '{key}' lacks PEFT's '{PEFT_PREFIX}' prefix")
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            if ".lora_" in key:
                return Finding("adapter-keys", False, f"tensor '{key}': PEFT saves LoRA weights as "
                                                      f"<module>.lora_A.weight, with no adapter name inside")
            if not any(f".{m}." in f".{key}" for m in saved):
                return Finding("adapter-keys", False, f"tensor '{key}' is neither a LoRA weight nor in "
                                                      f"modules_to_save")
            continue
        pairs.setdefault(key[:-len(suffix)], {})[suffix] = info.shape
    for module, found in pairs.items():
        if len(found) != 2:
            lacking = next(s for s in _LORA_SUFFIXES if s not in found)
            return Finding("adapter-keys", False, f"{module}{lacking} is missing (LoRA needs A and B)")
        rank = next((v for k, v in rank_pattern.items() if module.endswith(k)), r) if rank_pattern else r
        a, b = found[".lora_A.weight"], found[".lora_B.weight"]
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            return Finding("adapter-keys", False, f"{module}: lora_A {list(a)} / lora_B {list(b)} disagree with "
                                                  f"r={rank}")
    if not pairs:
        return Finding("adapter-keys", False, "no LoRA weights in the file")
    targets = config["target_modules"]  # a string ("all-linear" or a regex) matches by rules PEFT owns
    stray = [m for m in pairs if m.rsplit(".", 1)[-1] not in targets] if isinstance(targets, list) else []
    if stray:
        return Finding("adapter-keys", False, f"{stray[0]} is not among target_modules {targets}: PEFT would "
                                              f"not inject a layer for it")
    return Finding("adapter-keys", True, f"{len(pairs)} LoRA modules, PEFT key layout, ranks match r")


def _alone(folder: Path) -> Finding:
    weights = next((n for n in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS) if (folder / n).exists()), None)
    if weights and (folder / CONFIG_NAME).is_file():
        return Finding("adapter-alone", False, f"the folder also holds a model ({CONFIG_NAME} + {weights}): "
                                               f"keep adapters in their own folder")
    return Finding("adapter-alone", True, "the folder holds the adapter only")


def check_adapter_folder(folder: str | Path) -> CheckReport:
    """PEFT's loader contract against a saved adapter folder."""
    folder = Path(folder)
    report = CheckReport(folder, "peft")
    if not folder.is_dir():
        report.findings.append(Finding("readable", False, f"{folder}: no such folder"))
        return report
    config, finding = _config(folder)
    report.findings.append(finding)
    tensors, finding = _weights(folder)
    report.findings.append(finding)
    if config is not None and tensors is not None:
        report.findings.append(_keys(tensors, config))
    report.findings.append(_alone(folder))
    base = (config or {}).get("base_model_name_or_path")
    report.parallelism = [f"follows its base model ({base or 'base_model_name_or_path not set'}); vLLM serves it "
                          f"with --enable-lora --lora-modules NAME={folder}"]
    return report
