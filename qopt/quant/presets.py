"""The quantization presets by name, torch-free so the command line can list them without importing torch."""
from __future__ import annotations

# name -> transformers' BitsAndBytesConfig fields ("dq": the absmax statistics double-quantized too)
PRESETS: dict[str, dict[str, object]] = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
}
