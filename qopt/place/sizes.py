"""What a model occupies before any weight exists: quantized sizes, the sizing view accelerate plans on, the
KV cache and activation estimates, and the meta-device model itself.

The loader and `plan()` place the same sizing view: a meta copy of the model in which every quantized Linear
is a placeholder holding exactly its quantized bytes (weight plus statistics), so accelerate sees the real
sizes without a weight being read.
"""
from __future__ import annotations

import copy

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from torch import nn

from ..model.config import OPTConfig
from ..model.network import OPTDecoderLayer, OPTForCausalLM
from ..quant.config import QuantizationConfig
from ..quant.formats import BLOCKSIZE, quantized_weight_bytes
from ..quant.modules import bits_of, is_quantized, swap_linears_on_meta

NO_SPLIT = [OPTDecoderLayer.__name__]  # accelerate never splits a decoder layer across devices
DEFAULT_PREFETCH_DEPTH = 2  # offloaded layers read ahead of the one computing (the layer-major runner's default)
PACKED_HEAD_CACHE_MAX_BYTES = 256 * 2**20  # a larger output head is packed for each generate call, not kept
ONEDNN_ROW_BLOCK, ONEDNN_COLUMN_BYTES = 64, 64  # the padding of oneDNN's packed matmul weight (fp32 and bf16)
DeviceMap = dict[str, "int | str"]  # module name -> GPU index, "cpu", "disk" or "host" (stored in RAM, run on the GPU)


# -- sizes ----------------------------------------------------------------------------------------------------
def _module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """A quantized Linear's bytes: weight and statistics, plus its bias (4-bit biases live in the compute dtype)."""
    bits = bits_of(module)
    double = bits == 4 and bool(module.weight.compress_statistics)
    size = quantized_weight_bytes(module.out_features, module.in_features, bits, double)
    if module.bias is not None:
        bias_dtype = getattr(module, "compute_dtype", None) or dtype
        size += module.out_features * torch.empty(0, dtype=bias_dtype).element_size()
    return size


def cpu_layout_bytes(module: nn.Module) -> int:
    """What a 4-bit Linear computing on a CPU whose kernel repacks it (AVX512-BF16) holds beyond its standard
    bytes: the absmax as a bf16 copy (the standard statistics stay, for saving)."""
    if not is_quantized(module) or bits_of(module) != 4:
        return 0
    return 2 * -(-module.out_features * module.in_features // BLOCKSIZE)


def packed_head_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The oneDNN copy of the output head that CPU generation keeps between calls (up to
    `PACKED_HEAD_CACHE_MAX_BYTES`; a larger head is packed per call and freed after it)."""
    head = getattr(model, "lm_head", None)
    if head is None or is_quantized(head) or dtype not in (torch.bfloat16, torch.float32):
        return 0
    size = torch.empty(0, dtype=dtype).element_size()
    if head.weight.numel() * size > PACKED_HEAD_CACHE_MAX_BYTES:
        return 0
    rows, cols = head.weight.shape  # oneDNN's blocked layout pads both (rows to 64, columns to 64 bytes)
    return _round_up(rows, ONEDNN_ROW_BLOCK) * _round_up(cols, ONEDNN_COLUMN_BYTES // size) * size


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class _Bytes(nn.Module):
    """Stands for a quantized layer (or a KV cache) in the sizing view: one meta tensor of its exact byte size."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("nbytes", torch.empty(nbytes, dtype=torch.uint8, device="meta"))


def sizing_view(model: nn.Module, dtype: torch.dtype, kv_bytes_per_layer: int = 0, cpu_layout: bool = False
                ) -> nn.Module:
    """A meta copy of `model` whose quantized Linears (and KV caches) are exact-size placeholders; `cpu_layout`
    adds what the CPU kernel's layout holds beyond the standard bytes."""
    stand_ins = {id(m): _Bytes(_module_bytes(m, dtype) + (cpu_layout_bytes(m) if cpu_layout else 0))
                 for m in model.modules() if is_quantized(m)}
    view = copy.deepcopy(model, memo=stand_ins)  # deepcopy takes what the memo already holds for those ids
    if kv_bytes_per_layer:
        for module in view.modules():
            if isinstance(module, OPTDecoderLayer):
                module.add_module("kv_cache", _Bytes(kv_bytes_per_layer))
    return view


def placed_bytes(model: nn.Module, dtype: torch.dtype, device_map: DeviceMap, device: int | str) -> int:
    """Bytes of the weights `device_map` puts on `device` (quantized sizes), e.g. what disk offload will write."""

    names = [name for name, placed in device_map.items() if placed == device]
    if not names:
        return 0
    sizes = compute_module_sizes(sizing_view(model, dtype), dtype=dtype)
    return sum(sizes[name] for name in names)


def kv_cache_bytes_per_layer(config: OPTConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Keys and values of one decoder layer for `batch` sequences of `context` tokens."""
    return 2 * batch * context * config.hidden_size * torch.empty(0, dtype=dtype).element_size()


LOGIT_CHUNK_ROWS = 512  # positions perplexity scores at a time, so fp32 log-probabilities never span a long window


def scoring_bytes(config: OPTConfig, context: int, dtype: torch.dtype) -> int:
    """What scoring every position of one window adds (perplexity): its logits in the model dtype, and for one
    chunk of `LOGIT_CHUNK_ROWS` positions their fp32 copy and fp32 log-probabilities."""
    size = torch.empty(0, dtype=dtype).element_size()
    rows = min(LOGIT_CHUNK_ROWS, context)
    return context * config.vocab_size * size + (1 + (size != 4)) * rows * config.vocab_size * 4


def activation_bytes(config: OPTConfig, context: int, batch: int, dtype: torch.dtype, all_logits: bool = False
                     ) -> int:
    """Peak working memory of one prefill of batch x context tokens (an estimate, not a measurement).

    The larger of the attention stage (residual, normed input, q, k, v, output: 6 hidden-sized tensors, plus the
    batch x heads x context^2 score matrix of a non-fused attention kernel) and the MLP stage (residual and
    normed input, fc1's output and its activation), plus the logits: fp32 for the last position of each
    sequence when generating, every position of one window when scoring (`all_logits`, `scoring_bytes`).
    """
    size = torch.empty(0, dtype=dtype).element_size()
    tokens = batch * context
    attention = 6 * tokens * config.hidden_size * size + batch * config.num_attention_heads * context ** 2 * size
    mlp = 2 * tokens * config.hidden_size * size + 2 * tokens * config.ffn_dim * size
    logits = scoring_bytes(config, context, dtype) if all_logits else batch * config.vocab_size * 4
    return max(attention, mlp) + logits


def meta_model(config: OPTConfig, quantization: QuantizationConfig | None, model_class: type | None = None
               ) -> nn.Module:
    """The model (default: the causal LM) on the meta device, tied, with each quantized Linear already its
    empty bitsandbytes module: what `qopt.load` fills and what `plan` measures."""
    with init_empty_weights(include_buffers=False):
        model = (model_class or OPTForCausalLM)(config)
    model.tie_weights()  # init_empty_weights re-creates each assigned parameter, which unties the head
    if quantization is not None:
        swap_linears_on_meta(model, quantization)
    return model


