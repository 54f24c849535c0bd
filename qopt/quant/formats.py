"""bitsandbytes' storage formats, written down once: block sizes, code books and rounding bounds, double
quantization, the saved-key layout and the bytes a quantized weight occupies.

Everything that must match bitsandbytes byte for byte (the fast quantizers, GPTQ's grids, the loader's key
checks, the memory plan) reads these facts from here, so a format change has one place to land.
"""
from __future__ import annotations

import math
from functools import cache

import torch
from bitsandbytes import functional as bnbf

from .internals import quantize_bounds

BLOCKSIZE = 64  # 4-bit weights per absmax (Params4bit's default; transformers' config has no field for it)
NESTED_BLOCKSIZE = 256  # absmax values per block of the double quantization (quantize_4bit's compress_statistics)
QUANT_TYPES_4BIT = ("nf4", "fp4")
INT8_ROW_FORMAT = 0  # `weight_format` value of LLM.int8's row-wise layout, the only one bitsandbytes still writes


@cache
def rounding_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code values ascending, midpoint bounds between them, stored index of each sorted value).

    Taken from bitsandbytes' own quantizer, so rounding here breaks ties exactly as `quantize_4bit` does.
    """
    bounds, order = quantize_bounds(quant_type)
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    return code[order], bounds, order


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, bnbf.QuantState, torch.Tensor]:
    """Compress a flat fp32 absmax vector as `quantize_4bit(compress_statistics=True)` does:
    (uint8 codes, the nested state, the mean that was subtracted first)."""
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return qabsmax, state2, offset


def saved_4bit_keys(quant_type: str, double_quant: bool) -> set[str]:
    """Keys a 4-bit Linear saves under its prefix (transformers' and bitsandbytes' layout), bias excluded."""
    keys = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    return keys | ({"weight.nested_absmax", "weight.nested_quant_map"} if double_quant else set())


SAVED_INT8_KEYS = frozenset({"weight", "SCB", "weight_format"})  # `weight_format` is optional when reading


def quantized_weight_bytes(out_features: int, in_features: int, bits: int, double_quant: bool = False) -> int:
    """Bytes of a quantized weight and its statistics, as the loaded bitsandbytes module holds them."""
    n = out_features * in_features
    if bits == 8:
        return n + 4 * out_features  # int8 codes + fp32 row scales (SCB)
    blocks = math.ceil(n / BLOCKSIZE)
    stats = 16 * 4  # the 16-entry fp32 code book
    if double_quant:  # uint8 absmax + fp32 nested absmax, 256-entry nested code book, fp32 offset
        stats += blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 256 * 4 + 4
    else:
        stats += 4 * blocks
    return math.ceil(n / 2) + stats
