"""What other loaders expect of a saved model folder, checked from config.json and the shard headers alone.

`qopt check DIR --for vllm|transformers` runs these rules; each names what a consumer's loader would do with
the folder, so a failure says what breaks there before anyone starts a GPU. The contracts were read from:

- vLLM's pre-quantized bitsandbytes loader, in tree through vLLM 0.27 (vllm-project/vllm, commit c9e9c48:
  `vllm/model_executor/model_loader/bitsandbytes_loader.py`, `BitsAndBytesModelLoader`, and
  `vllm/model_executor/layers/quantization/bitsandbytes.py`, `BitsAndBytesConfig.from_config` and
  `is_layer_skipped_bnb`); from vLLM 0.28 the same loader ships as the `vllm-bnb-plugin` package
  (vllm-project/vllm-bnb-plugin 0.0.1: `vllm_bnb_plugin/bitsandbytes_loader.py`,
  `vllm_bnb_plugin/quantization/config.py`, `vllm_bnb_plugin/quantization/utils.py`). vLLM's OPT
  (`vllm/model_executor/models/opt.py`) fuses q/k/v into one `qkv_proj` and ties lm_head to the embeddings.
- transformers 5.24: `BitsAndBytesConfig` (`utils/quantization_config.py`), the skip list
  (`quantizers/base.py`, `get_modules_to_not_convert`) and adapters found beside a model
  (`integrations/peft.py`, `maybe_load_adapters`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QoptError
from ..io.checkpoint import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TensorInfo,
    inspect_checkpoint,
    normalize_key,
)
from ..model.config import CONFIG_NAME, OPTConfig
from ..model.network import decoder_layer_index
from ..place.sizes import meta_model
from ..quant.config import HEADS, VLLM_FUSED, QuantizationConfig
from ..quant.formats import QUANT_TYPES_4BIT, SAVED_INT8_KEYS, saved_4bit_keys
from ..utils import FLOAT_DTYPES

_STATE_KEY = "weight.quant_state.bitsandbytes__"


@dataclass(frozen=True)
class Finding:
    """One rule's verdict; a failed rule that is not `fatal` is a note (the consumer loads, but differently)."""

    rule: str
    passed: bool
    detail: str
    fatal: bool = True


@dataclass
class CheckReport:
    folder: Path
    consumer: str
    findings: list[Finding] = field(default_factory=list)
    parallelism: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.passed and f.fatal]

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        verdict = "loads" if self.ok else f"would fail ({len(self.failures)} rule{'s' * (len(self.failures) > 1)})"
        lines = [f"{self.folder} for {self.consumer}: {verdict}"]
        for f in self.findings:
            mark = "ok  " if f.passed else "FAIL" if f.fatal else "note"
            lines.append(f"  {mark} {f.rule:<15} {f.detail}")
        lines += [f"  parallelism: {line}" for line in self.parallelism]
        return "\n".join(lines)


@dataclass
class SavedModel:
    """A model folder as the rules see it: raw config.json, shard headers, and each Linear's stored width."""

    folder: Path
    config: dict[str, Any]
    opt: OPTConfig
    tensors: dict[str, TensorInfo]  # model-side names ("model.decoder...")
    weight_files: set[str]  # shard file names the checkpoint's index (or single file) uses
    linears: dict[str, int | None]  # Linear module -> 4 | 8 | 16 as stored, None when its weight is missing

    @property
    def quant(self) -> dict[str, Any] | None:
        value = self.config.get("quantization_config")
        return value if isinstance(value, dict) else None

    def quant_types(self) -> set[str]:
        return {k.rsplit("__", 1)[1] for k in self.tensors if _STATE_KEY in k}

    def widths(self, decoder_only: bool = True) -> set[int]:
        return {b for n, b in self.linears.items() if b in (4, 8) and (not decoder_only or _in_layer(n))}


def _in_layer(name: str) -> bool:
    return decoder_layer_index(name) is not None


def read_saved_model(folder: str | Path) -> SavedModel:
    """Headers and config only: no tensor data is read, so a 175B folder is checked in a second."""
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    opt = OPTConfig.from_pretrained(folder)  # one-line errors for a missing or malformed config
    config = json.loads(config_file.read_text())
    files = inspect_checkpoint(folder)
    tensors = {normalize_key(k, True): v for k, v in files.tensors.items()}
    model = meta_model(opt, None)
    linears: dict[str, int | None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (name == "lm_head" and opt.tie_word_embeddings):
            continue
        weight = tensors.get(f"{name}.weight")
        if f"{name}.SCB" in tensors or (weight is not None and weight.dtype == torch.int8):
            linears[name] = 8
        elif any(k.startswith(f"{name}.{_STATE_KEY}") for k in tensors) or (
                weight is not None and weight.dtype == torch.uint8):
            linears[name] = 4
        else:
            linears[name] = None if weight is None else 16
    return SavedModel(folder, config, opt, tensors, {p.name for p in files.shards}, linears)


# -- how each consumer decides that a module stays 16-bit ------------------------------------------------------
def vllm_skips(module: str, skip: list[str]) -> bool:
    """vLLM's `is_layer_skipped_bnb`, applied to the name vLLM gives the module (q/k/v -> their fused name)."""
    stem, _, last = module.rpartition(".")
    for fused, parts in VLLM_FUSED.items():
        if last in parts:
            module = f"{stem}.{fused}"
    components = module.split(".")
    prefixes = {".".join(components[:i + 1]) for i in range(len(components))}
    return any(s in components for s in skip) or bool(prefixes & set(skip))


def transformers_skips(module: str, skip: list[str]) -> bool:
    """transformers' match, which `QuantizationConfig.bits_for` follows: from the start up to a module boundary,
    or as a suffix."""
    return QuantizationConfig(load_in_4bit=True, llm_int8_skip_modules=list(skip)).bits_for(module) == 16


# -- the rules ---------------------------------------------------------------------------------------------
Rule = Callable[[SavedModel, str], "Finding | None"]


def _architecture(m: SavedModel, consumer: str) -> Finding | None:
    if consumer != "vllm":
        return None
    arch = m.config.get("architectures") or []
    return Finding("architecture", "OPTForCausalLM" in arch,
                   f"architectures {arch}" + ("" if "OPTForCausalLM" in arch else
                                              ": vLLM serves OPT as OPTForCausalLM only"))


def _quant_method(m: SavedModel, consumer: str) -> Finding:
    if m.quant is None:
        how = ("vLLM quantizes it while loading with --quantization bitsandbytes (NF4 + double quant)"
               if consumer == "vllm" else "pass a BitsAndBytesConfig to quantize while loading")
        return Finding("quant-method", True, f"unquantized checkpoint ({m.opt.torch_dtype or 'float32'}); {how}")
    method = m.quant.get("quant_method")
    return Finding("quant-method", method == "bitsandbytes", f"quantization_config.quant_method is {method!r}"
                   + ("" if method == "bitsandbytes" else ", expected 'bitsandbytes'"))


def _load_flags(m: SavedModel, consumer: str) -> Finding:
    flags = {k: m.quant.get(k) for k in ("load_in_4bit", "load_in_8bit")}
    bad = [k for k, v in flags.items() if not isinstance(v, bool)]
    if bad:
        default = "4-bit, whatever the tensors are" if consumer == "vllm" else "not quantized"
        return Finding("load-flags", False, f"quantization_config lacks a true/false '{bad[0]}' (only the private "
                                            f"'_{bad[0]}' or nothing): {consumer} then reads the model as {default}")
    if flags["load_in_4bit"] == flags["load_in_8bit"]:
        return Finding("load-flags", False, "load_in_4bit and load_in_8bit must be one true and one false")
    bits = 8 if flags["load_in_8bit"] else 4
    stored = m.widths(decoder_only=False)
    if stored and stored != {bits}:
        return Finding("load-flags", False, f"config says {bits}-bit, the tensors hold {sorted(stored)}-bit linears")
    return Finding("load-flags", True, f"load_in_{bits}bit")


def _single_width(m: SavedModel, consumer: str) -> Finding:
    widths = m.widths()
    if len(widths) > 1:
        mixed = sum(1 for n, b in m.linears.items() if _in_layer(n) and b == 8)
        return Finding("single-width", False, f"mixed 4/8-bit model (qopt_module_bits, {mixed} int8 linears): "
                                              f"qopt-only, {consumer} gives every quantized linear one width")
    return Finding("single-width", True, f"one quantized width ({', '.join(f'{b}-bit' for b in widths) or 'none'})")


def _quant_type(m: SavedModel, consumer: str) -> Finding:
    declared, stored = m.quant.get("bnb_4bit_quant_type"), m.quant_types()
    vllm = consumer == "vllm"  # transformers takes the type from each tensor's stored quant state
    if declared not in QUANT_TYPES_4BIT:
        return Finding("quant-type", False, f"bnb_4bit_quant_type is {declared!r}, expected 'nf4' or 'fp4' written "
                                            f"out ({consumer}'s default is fp4)", fatal=vllm)
    if stored - {declared}:
        return Finding("quant-type", False, f"bnb_4bit_quant_type is {declared!r}, tensors are {sorted(stored)}",
                       fatal=vllm)
    return Finding("quant-type", True, f"bnb_4bit_quant_type {declared!r}")


def _double_quant(m: SavedModel, consumer: str) -> Finding:
    declared = m.quant.get("bnb_4bit_use_double_quant")
    nested = any(k.endswith(".weight.nested_absmax") for k in m.tensors)
    vllm = consumer == "vllm"  # transformers reads the nesting from the tensors
    if not isinstance(declared, bool):
        return Finding("double-quant", False, f"bnb_4bit_use_double_quant is {declared!r}, expected true or false",
                       fatal=vllm)
    return Finding("double-quant", declared == nested, f"bnb_4bit_use_double_quant {declared}" +
                   ("" if declared == nested else f", but nested statistics are {'present' if nested else 'absent'}"),
                   fatal=vllm)


def _compute_dtype(m: SavedModel, consumer: str) -> Finding | None:
    if consumer != "vllm":
        return None
    value = m.quant.get("bnb_4bit_compute_dtype")
    ok = isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES
    return Finding("compute-dtype", ok, f"bnb_4bit_compute_dtype {value!r}" + ("" if ok else ", expected a float "
                                                                                 "dtype name written out"))


def _quant_storage(m: SavedModel, consumer: str) -> Finding:
    declared = str(m.quant.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    odd = sorted({str(m.tensors[f"{n}.weight"].dtype).removeprefix("torch.") for n, b in m.linears.items()
                  if b == 4 and f"{n}.weight" in m.tensors} - {declared})
    if consumer == "vllm" and declared != "uint8":
        return Finding("quant-storage", False, f"bnb_4bit_quant_storage {declared!r}: vLLM reads uint8 only")
    if odd:
        return Finding("quant-storage", False, f"4-bit weights stored as {odd}, config says {declared}",
                       fatal=consumer == "vllm")
    return Finding("quant-storage", True, f"bnb_4bit_quant_storage {declared}")


def _skip_modules(m: SavedModel, consumer: str) -> Finding:
    skip = m.quant.get("llm_int8_skip_modules") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        return Finding("skip-modules", False, f"llm_int8_skip_modules is {skip!r}, expected a list of names")
    skips = vllm_skips if consumer == "vllm" else transformers_skips
    unlisted = [n for n, b in m.linears.items() if b == 16 and n not in HEADS and not skips(n, skip)]
    quantized = [n for n, b in m.linears.items() if b in (4, 8) and skips(n, skip)]
    if consumer == "transformers" and skip and "lm_head" not in skip:
        unlisted.append("lm_head")  # a given list replaces transformers' default skips, tied lm_head among them
    if unlisted:
        where = "vLLM's fused qkv_proj name" if consumer == "vllm" and any(
            n.rpartition(".")[2] in VLLM_FUSED["qkv_proj"] for n in unlisted) else "llm_int8_skip_modules"
        return Finding("skip-modules", False, f"16-bit {unlisted[0]}{' and more' if len(unlisted) > 1 else ''} is "
                                              f"not named by {where}: {consumer} would expect it quantized")
    if quantized:
        return Finding("skip-modules", False, f"{quantized[0]} is quantized but llm_int8_skip_modules names it: "
                                              f"{consumer} would expect a 16-bit weight")
    sixteen = sum(1 for n, b in m.linears.items() if b == 16 and n not in HEADS)
    return Finding("skip-modules", True, f"{sixteen} 16-bit linears besides the heads" +
                   (", each named by llm_int8_skip_modules" if sixteen else ""))


def _tensors(m: SavedModel, consumer: str) -> Finding:
    double = bool(m.quant.get("bnb_4bit_use_double_quant"))
    for name, bits in m.linears.items():
        if bits is None:
            return Finding("tensors", False, f"{name}.weight is missing")
        present = {k[len(name) + 1:] for k in m.tensors if k.startswith(name + ".")} - {"bias"}
        if bits == 4:
            qtype = next((k.rsplit("__", 1)[1] for k in present if k.startswith(_STATE_KEY)), "nf4")
            need, dtype = saved_4bit_keys(qtype, double), "uint8"
        elif bits == 8:
            need, dtype = set(SAVED_INT8_KEYS) - {"weight_format"}, "int8"
        else:
            continue
        missing = sorted(need - present)
        if missing:
            return Finding("tensors", False, f"{name}.{missing[0]} is missing ({bits}-bit linears store "
                                             f"{', '.join(sorted(need))})")
        stored = str(m.tensors[f"{name}.weight"].dtype).removeprefix("torch.")
        if bits == 8 and stored != dtype:
            return Finding("tensors", False, f"{name}.weight is {stored}, an 8-bit weight is int8 (with .SCB)")
    return Finding("tensors", True, "every quantized linear has its weight and statistics (bitsandbytes layout)")


def _qkv_split(m: SavedModel, consumer: str) -> Finding:
    fused = next((k for k in m.tensors if any(f".{f}." in k for f in VLLM_FUSED)), None)
    if fused:
        why = "vLLM fuses them itself" if consumer == "vllm" else "OPT has no fused module"
        return Finding("qkv-split", False, f"{fused}: q/k/v must be stored as separate q_proj/k_proj/v_proj ({why})")
    if consumer == "vllm":
        for i in range(m.opt.num_hidden_layers):
            parts = [f"model.decoder.layers.{i}.self_attn.{p}" for p in VLLM_FUSED["qkv_proj"]]
            widths = {m.linears.get(p) for p in parts}
            if len(widths) > 1:
                return Finding("qkv-split", False, f"layer {i} stores q/k/v in {sorted(map(str, widths))} bits: vLLM "
                                                   f"runs them as one fused qkv_proj of one width")
    return Finding("qkv-split", True, "q_proj, k_proj, v_proj stored separately" +
                   (", one width per layer" if consumer == "vllm" else ""))


def _weight_files(m: SavedModel, consumer: str) -> Finding:
    extra = sorted(p.name for p in m.folder.glob("*.safetensors") if p.name not in m.weight_files)
    if not extra:
        return Finding("weight-files", True, f"only the model's weights ({len(m.weight_files)} safetensors file"
                                             f"{'s' * (len(m.weight_files) > 1)})")
    indexed = (m.folder / SAFE_INDEX).is_file()
    if consumer == "vllm" and not indexed:
        return Finding("weight-files", False, f"{extra[0]} is not part of the model, and vLLM reads every "
                                              f"*.safetensors of a folder without {SAFE_INDEX}")
    return Finding("weight-files", False, f"{extra[0]} sits beside the weights ({consumer} skips it: only "
                                          f"{SAFE_INDEX if indexed else SAFE_WEIGHTS} is read)", fatal=False)


def _no_adapter(m: SavedModel, consumer: str) -> Finding:
    found = next((n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN) if (m.folder / n).exists()), None)
    if found is None:
        return Finding("no-adapter", True, "no adapter files in the model folder")
    if consumer == "vllm":
        return Finding("no-adapter", False, f"{found} in a model folder: vLLM's bitsandbytes loader reads "
                                            f"{ADAPTER_CONFIG} there; keep adapters in their own folder")
    return Finding("no-adapter", False, f"{found} in the model folder: transformers applies that adapter on every "
                                        f"load; keep adapters in their own folder", fatal=False)


QUANT_RULES: tuple[Rule, ...] = (_load_flags, _single_width, _tensors, _skip_modules, _qkv_split)
FOUR_BIT_RULES: tuple[Rule, ...] = (_quant_type, _double_quant, _compute_dtype, _quant_storage)


def _parallelism(m: SavedModel, consumer: str) -> list[str]:
    layers, heads = m.opt.num_hidden_layers, m.opt.num_attention_heads
    if consumer != "vllm":
        return ["device_map='auto' splits decoder layers over GPUs and CPU (one device computes at a time)"]
    stages = f"pipeline parallel: 1 to {layers} stages (--pipeline-parallel-size, across GPUs and nodes)"
    if m.quant is None:
        sizes = [t for t in (1, 2, 4, 8, 16) if heads % t == 0]
        return [f"tensor parallel: {', '.join(map(str, sizes))} (sizes dividing {heads} heads; vLLM quantizes each "
                f"shard itself with --quantization bitsandbytes)", stages]
    lines = ["tensor parallel: 1 only (vLLM refuses pre-quantized bitsandbytes with TP > 1; give it the fp16 "
             "checkpoint to shard)", stages]
    if m.quant.get("load_in_8bit") is True:
        lines.append("8-bit runs eagerly: vLLM turns CUDA graphs off for bitsandbytes 8-bit")
    return lines


def check_model_folder(folder: str | Path, consumer: str) -> CheckReport:
    """Every rule of `consumer` ("vllm" | "transformers") against a saved model folder."""
    if consumer not in ("vllm", "transformers"):
        raise ValueError(f"consumer {consumer!r}: model folders are checked for vllm or transformers")
    report = CheckReport(Path(folder), consumer)
    try:
        saved = read_saved_model(folder)
    except (QoptError, OSError, ValueError) as err:
        report.findings.append(Finding("readable", False, str(err)))
        return report
    rules: list[Rule] = [_architecture, _quant_method]
    if saved.quant is not None and saved.quant.get("quant_method") == "bitsandbytes":
        rules += list(QUANT_RULES)
        if saved.quant.get("load_in_4bit") is True or 4 in saved.widths(decoder_only=False):
            rules += list(FOUR_BIT_RULES)
    rules += [_weight_files, _no_adapter]
    report.findings += [f for f in (rule(saved, consumer) for rule in rules) if f is not None]
    report.parallelism = _parallelism(saved, consumer)
    return report


def rule_names() -> list[str]:
    """The ids `qopt check` can print, for documentation and tests."""
    return sorted({re.sub(r"^_", "", r.__name__).replace("_", "-") for r in (
        _architecture, _quant_method, *QUANT_RULES, *FOUR_BIT_RULES, _weight_files, _no_adapter)})
