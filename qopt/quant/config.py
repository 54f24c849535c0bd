"""`QuantizationConfig`: transformers' `BitsAndBytesConfig` fields, the presets, and which module gets which width."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..model.network import decoder_layer_index
from ..utils import DTYPES
from .formats import BLOCKSIZE
from .presets import PRESETS

HEADS = ("lm_head", "score", "qa_outputs")  # output heads stay 16-bit, as transformers keeps them
_MODULE_BITS = "qopt_module_bits"  # per-module widths of a mixed 4/8-bit model (qopt-only: transformers has one width)
# vLLM runs OPT's q/k/v as one fused module and decides its width from that name (vllm/model_executor/models/opt.py)
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@dataclass
class QuantizationConfig:
    """transformers' `BitsAndBytesConfig` fields; `to_dict()` is the `quantization_config` of config.json."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None  # None: only the output heads stay 16-bit
    llm_int8_enable_fp32_cpu_offload: bool = False  # kept for round trips; qopt offloads quantized layers as is
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: torch.dtype = torch.bfloat16
    bnb_4bit_quant_storage: torch.dtype = torch.uint8
    module_bits: dict[str, int] = field(default_factory=dict)  # full module name -> 4 | 8 | 16
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other keys found in config.json

    def __post_init__(self) -> None:
        for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value.removeprefix("torch.") not in DTYPES:
                    raise ConfigError(f"quantization_config: field '{name}' is {value!r}, expected one of "
                                      f"{sorted(DTYPES)}")
                setattr(self, name, DTYPES[value.removeprefix("torch.")])
        if self.load_in_4bit == self.load_in_8bit:
            raise ConfigError("quantization_config: set exactly one of 'load_in_4bit' and 'load_in_8bit'")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quantization_config: field 'bnb_4bit_quant_type' must be 'nf4' or 'fp4', "
                              f"got {self.bnb_4bit_quant_type!r}")
        if self.llm_int8_has_fp16_weight:
            raise ConfigError("quantization_config: 'llm_int8_has_fp16_weight' (int8 training with float master "
                              "weights) is not supported; train LoRA adapters on the frozen int8 weights instead")
        bad = {n: b for n, b in self.module_bits.items() if b not in (4, 8, 16)}
        if bad:
            raise ConfigError(f"quantization_config: field '{_MODULE_BITS}' maps modules to 4, 8 or 16, got {bad}")

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4

    @property
    def blocksize(self) -> int:
        return BLOCKSIZE

    @property
    def name(self) -> str:
        """The preset name ("int8", "nf4-dq", ...) for summaries."""
        if self.load_in_8bit:
            return "int8"
        return self.bnb_4bit_quant_type + ("-dq" if self.bnb_4bit_use_double_quant else "")

    @property
    def mixed_widths(self) -> list[int]:
        """Widths other than `bits` that decoder-layer linears have (empty for a single-width model; 16-bit heads
        and OPT-350M's 16-bit project_in / project_out do not make a model mixed)."""
        widths = {bits for name, bits in self.module_bits.items() if decoder_layer_index(name) is not None}
        if any(decoder_layer_index(name) is not None for name in self.llm_int8_skip_modules or ()):
            widths.add(16)
        return sorted(widths - {self.bits})

    @property
    def label(self) -> str:
        """What tables call the stored format: `name`, or "nf4+int8 mixed" when decoder linears differ in width
        (the bits/param columns then say what the mix costs)."""
        others = ["int8" if bits == 8 else f"{bits}-bit" for bits in self.mixed_widths]
        return "+".join([self.name, *others]) + " mixed" if others else self.name

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "QuantizationConfig":
        """"int8" | "nf4" | "fp4" | "nf4-dq" | "fp4-dq" (dq = double quantization of the absmax)."""
        key = str(name).lower()
        if key not in PRESETS:
            raise ConfigError(f"quantization {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = {"quant_method": "bitsandbytes", "_load_in_8bit": self.load_in_8bit,
                "_load_in_4bit": self.load_in_4bit, "llm_int8_threshold": self.llm_int8_threshold,
                "llm_int8_skip_modules": self.saved_skip_modules(),
                "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
                "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
                "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
                "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).removeprefix("torch."),
                "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).removeprefix("torch."),
                "load_in_4bit": self.load_in_4bit, "load_in_8bit": self.load_in_8bit}
        if self.module_bits:
            data[_MODULE_BITS] = dict(self.module_bits)
        data.update({k: v for k, v in self.extra.items() if k not in data})
        return data

    def saved_skip_modules(self) -> list[str] | None:
        """`llm_int8_skip_modules` as saved: every 16-bit `module_bits` entry is listed, so transformers and vLLM
        keep it unquantized too (with lm_head, since a given list replaces transformers' default skips), and a
        layer whose q/k/v are all 16-bit also names vLLM's fused `qkv_proj`, the module vLLM looks up."""
        sixteen = [name for name, bits in self.module_bits.items() if bits == 16]
        if not sixteen:
            return self.llm_int8_skip_modules
        skip = set(self.llm_int8_skip_modules or []) | set(sixteen) | {"lm_head"}
        for fused, parts in VLLM_FUSED.items():
            for name in sixteen:
                stem, _, last = name.rpartition(".")
                if last == parts[0] and all(f"{stem}.{p}" in sixteen for p in parts):
                    skip.add(f"{stem}.{fused}")
        return sorted(skip)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "quantization_config") -> "QuantizationConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        method = data.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ConfigError(f"{source}: field 'quant_method' is {method!r}; qopt reads only 'bitsandbytes'")
        names = {f for f in cls.__dataclass_fields__ if f not in ("module_bits", "extra")}
        kwargs = {k.lstrip("_"): v for k, v in data.items() if k.lstrip("_") in names}
        extra = {k: v for k, v in data.items()
                 if k.lstrip("_") not in names and k not in ("quant_method", _MODULE_BITS)}
        try:
            return cls(**kwargs, module_bits=dict(data.get(_MODULE_BITS) or {}), extra=extra)
        except ConfigError as err:
            raise ConfigError(str(err).replace("quantization_config", source, 1)) from None

    @classmethod
    def from_bits(cls, bits: int, quant_type: str = "nf4", double_quant: bool = False,
                  compute_dtype: torch.dtype = torch.bfloat16) -> "QuantizationConfig":
        """The config a planner means by a bit width (8: LLM.int8; 4: `quant_type`, optionally double quant)."""
        return cls(load_in_8bit=bits == 8, load_in_4bit=bits == 4, bnb_4bit_quant_type=quant_type,
                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)

    @classmethod
    def coerce(cls, value: "str | Mapping[str, Any] | QuantizationConfig | Any") -> "QuantizationConfig":
        """A preset name, a dict, our config, or any object with BitsAndBytesConfig's `to_dict()`."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.from_name(value)
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        return cls.from_dict(value)

    def bits_for(self, name: str) -> int:
        """4, 8 or 16 for the Linear module called `name` (a full module name)."""
        if _matches(name, HEADS) or _matches(name, self.llm_int8_skip_modules or ()):
            return 16
        short = name.removeprefix("model.")
        for key, bits in self.module_bits.items():
            if key.removeprefix("model.") == short:
                return bits
        return self.bits


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary (also as a regex), or as a
    suffix ("fc1" matches "model.decoder.layers.3.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(name.endswith(p) or re.match(rf"(?:{p}){boundary}", name) for p in patterns)
