"""The memory plan of a LoRA / QLoRA fine-tune (`qopt plan --finetune`), before any weight is read.

Weights come from the loader's own sizing (`meta_model` + `sizing_view`: quantized bytes from
`qopt.quant.formats`), the adapter from `add_lora` run on that meta model (the same target resolution a real
run does), the optimizer state from the optimizers' storage rules, and activations from a count of what
autograd keeps for one decoder layer of `qopt.model.network` on the default `qopt.finetune` path (residual
stream in fp32 after `prepare_for_kbit_training`, quantized matmuls in the compute dtype, adapters in fp32,
no autocast). The count is checked against measured peaks by evals/validate_finetune_plan.py; the design notes
(docs/design.md, "The fine-tune memory plan") say where it is exact and where it is an estimate.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import compute_module_sizes

from ..io.checkpoint import inspect_checkpoint
from ..model.config import OPTConfig
from ..model.head_loss import chunk_rows
from ..place.plan import config_for
from ..place.sizes import meta_model, sizing_view
from ..quant.config import QuantizationConfig
from ..quant.modules import is_quantized
from ..utils import DTYPES, format_bytes, parse_size
from .lora import LoraConfig, add_lora, lora_layers, short_target_names
from .trainer import OPTIMIZERS, TrainingArguments

GiB = 2**30
HUB_SHARD_BYTES = 10 * 10**9  # the facebook/opt-* checkpoints are fp16 .bin shards of at most 10 GB
CUDA_CONTEXT_BYTES = GiB // 2  # GPU memory the CUDA context and kernels hold before any tensor (typical)
CUDA_HOST_BYTES = GiB  # host memory of torch's CUDA runtime once initialised (typical)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep fp32 states for smaller tensors
BNB_STATE_BLOCK = 256  # values per absmax of a blockwise 8-bit optimizer state
# glibc keeps freed heap chunks resident, so on a CPU peak RSS exceeds the peak of live tensors. Fitted on the
# OPT-125M / 350M settings of evals/validate_finetune_plan.py (`--fit`; docs/design.md, "The fine-tune memory
# plan"): at the load's peak about 0.13 x the quantized linears' float32 bytes; during training about 0.06 x
# those bytes plus this share of the activations a step without checkpointing keeps (all layers recomputed /
# none; in between, in proportion to the layers recomputed).
CPU_HEAP_LOAD = 0.13
CPU_HEAP_WEIGHTS = 0.057
CPU_HEAP_TRAIN = {True: 0.89, False: 1.22}


@dataclass(frozen=True)
class Machine:
    """Where a fine-tune runs: one GPU (or none: the CPU trains) and the host RAM the load passes through."""

    name: str
    gpu_bytes: int | None
    host_bytes: int
    bf16: bool  # the GPU has bfloat16 arithmetic (Ampere and later); without it 16-bit compute is float16

    @property
    def device(self) -> str:
        return "cpu" if self.gpu_bytes is None else "cuda"


def _host_ram() -> int:
    from ..place.device_map import normalize_max_memory

    return int(normalize_max_memory(None).get("cpu", 0))


def machine_preset(name: str, gpu: str | int | None = None, host: str | int | None = None) -> Machine:
    """A preset by name ("colab-t4", "rtx-24gb", "cpu"), with --gpu / --cpu sizes overriding it."""
    presets = {"colab-t4": Machine("colab-t4", 15 * GiB, int(12.7 * GiB), bf16=False),
               "rtx-24gb": Machine("rtx-24gb", 24 * GiB, 32 * GiB, bf16=True)}
    if name == "cpu":
        base = Machine("cpu", None, _host_ram() if host is None else parse_size(host), bf16=True)
    elif name in presets:
        base = presets[name]
    else:
        raise ValueError(f"machine {name!r}: expected one of colab-t4, rtx-24gb, cpu")
    if gpu is not None:
        if base.gpu_bytes is None:
            raise ValueError("--gpu sizes a GPU; the cpu machine trains on the CPU (choose colab-t4 or rtx-24gb)")
        base = replace(base, gpu_bytes=parse_size(gpu))
    if host is not None:
        base = replace(base, host_bytes=parse_size(host))
    return base


@dataclass
class Sizes:
    """Bytes of one training configuration on the device that trains."""

    weights: int  # base weights as they sit during training (quantized linears, fp32 others)
    lora: int
    grads: int
    optimizer: int
    activations: int  # peak of what autograd keeps plus the head's buffers (dequantization buffers excluded)
    dequant: int  # the largest quantized weight dequantized (forward / backward temporaries)
    peak_activations: int  # activations and dequantization buffers at the moment they peak together
    runtime: int  # CUDA context, or the heap glibc retains on a CPU

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.grads + self.optimizer + self.peak_activations + self.runtime


@dataclass(kw_only=True)
class FinetunePlan:
    """A fine-tune's memory on its machine: the training device, and the host RAM during the load."""

    label: str
    machine: Machine
    quantization: str
    compute_dtype: torch.dtype
    optimizer: str
    r: int
    targets: list[str]
    lora_layers: int
    trainable: int
    batch: int
    seq: int
    gradient_checkpointing: bool
    checkpointed_layers: int  # decoder layers recomputed in backward (all with checkpointing on, unless "auto")
    sizes: Sizes
    other_activations: int  # peak activations with gradient checkpointing the other way
    half_head: bool = False  # the tied head kept in the compute dtype (qopt.finetune's fast path)
    host_load: dict[str, int] = field(default_factory=dict)  # what the host holds at the load's peak
    decoder_layers: int = 0
    kept_without_checkpointing: int = 0  # activations of a step that recomputes nothing: the CPU heap's basis
    largest_batch: int = 0  # at `seq`
    largest_seq: int = 0  # at `batch`

    @property
    def limit(self) -> int:
        return self.machine.gpu_bytes if self.machine.gpu_bytes is not None else self.machine.host_bytes

    @property
    def host_load_peak(self) -> int:
        return sum(self.host_load.values())

    @property
    def fits(self) -> bool:
        return self.sizes.total <= self.limit and self.host_load_peak <= self.machine.host_bytes

    @property
    def verdict(self) -> str:
        where = "GPU" if self.machine.device == "cuda" else "CPU"
        problems = []
        if self.sizes.total > self.limit:
            problems.append(f"training needs {format_bytes(self.sizes.total)} of the {where}'s "
                            f"{format_bytes(self.limit)}")
        if self.host_load_peak > self.machine.host_bytes:
            problems.append(f"the load needs {format_bytes(self.host_load_peak)} of host RAM, the machine has "
                            f"{format_bytes(self.machine.host_bytes)}")
        return "does not fit: " + "; ".join(problems) if problems else f"fits on the {where}"

    def format(self) -> str:
        s, gc = self.sizes, self.gradient_checkpointing
        layers = self.decoder_layers
        ckpt = "on" if gc else "off"
        if gc and self.checkpointed_layers < layers:
            ckpt = f"on for {self.checkpointed_layers} of {layers} layers"
        dev = "GPU" if self.machine.device == "cuda" else "CPU"
        row = lambda name, value, note="": f"  {name:34s} {format_bytes(value):>11s}  {note}".rstrip()  # noqa: E731
        lines = [f"{self.label} fine-tune on {self.machine.name} ({dev} {format_bytes(self.limit)}, host RAM "
                 f"{format_bytes(self.machine.host_bytes)}): {self.quantization}, compute "
                 f"{str(self.compute_dtype).removeprefix('torch.')}, LoRA r={self.r} on "
                 f"{', '.join(self.targets)} ({self.lora_layers} layers, {self.trainable:,} parameters), "
                 f"{self.optimizer}, batch {self.batch} x {self.seq} tokens, gradient checkpointing {ckpt}",
                 f"{dev} during training:",
                 row("base weights", s.weights, "quantized linears; tied head in the compute dtype; norms fp32"
                     if self.half_head else "quantized linears; embeddings, norms, biases fp32"),
                 row("LoRA weights", s.lora),
                 row("LoRA gradients", s.grads),
                 row("optimizer state", s.optimizer, self.optimizer),
                 row("activations", s.activations, f"{self.checkpointed_layers} of {layers} layers recomputed; "
                     f"{'none' if gc else 'all'}: {format_bytes(self.other_activations)}"),
                 row("dequantization buffers", s.dequant, "largest quantized weight, forward and backward"),
                 row("activation peak", s.peak_activations, "activations and buffers live at the same time"),
                 row("CUDA context" if dev == "GPU" else "retained heap (glibc)", s.runtime,
                     "typical" if dev == "GPU" else "freed but resident memory, fitted here"),
                 row("total", s.total, f"of {format_bytes(self.limit)}"),
                 "host RAM during the load:"]
        lines += [row(name, value) for name, value in self.host_load.items()]
        lines.append(row("peak", self.host_load_peak, f"of {format_bytes(self.machine.host_bytes)}"))
        lines.append(f"largest batch at {self.seq} tokens: {self.largest_batch or 'none'}; longest sequence at "
                     f"batch {self.batch}: {self.largest_seq or 'none'}")
        if dev == "CPU":  # the one 16-bit choice that costs speed here, measured
            lines.append("on a CPU: autocast in bf16 (--bf16), not fp16: CPUs have no fast float16 matmuls "
                         "(a fine-tune measured 53x slower with --fp16)")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


# -- the counts -----------------------------------------------------------------------------------------------
def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def optimizer_bytes(shapes: list[int], optimizer: str, dtype: torch.dtype = torch.float32) -> int:
    """State bytes for trainable tensors of `shapes` elements: AdamW keeps two moments in the parameter dtype;
    bitsandbytes' 8-bit AdamW two uint8 moments with an fp32 absmax per 256 (fp32 below 4,096 elements)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
    total = 0
    for n in shapes:
        if optimizer == "adamw" or n < BNB_MIN_8BIT_SIZE:
            total += 2 * n * (_size(dtype) if optimizer == "adamw" else 4)
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_STATE_BLOCK)
    return total


@dataclass
class _Shape:
    """What the activation count needs from a model and its adapter."""

    config: OPTConfig
    residual: int  # bytes per element of the residual stream (fp32 once prepared for k-bit training)
    compute: int  # bytes per element of the quantized matmuls' inputs and outputs
    state: int  # bytes per element of a dequantized weight before its cast to the compute dtype
    adapter: int
    mask: int  # bytes per element of a dropout mask: the activation's dtype on a CPU, bool on CUDA
    targets_per_layer: list[str]  # short names of the adapted linears of one decoder layer
    r: int
    lora_dropout: float
    largest_quantized: int  # elements of the largest quantized weight (0: none)
    fused_loss: bool = True  # the loss through the frozen head a chunk at a time (model/head_loss.py)


def _layer_bytes(shape: _Shape, batch: int, seq: int) -> int:
    """What autograd keeps for one decoder layer in training (no checkpointing), from the network's code:
    norm output, q, k and v copies, attention output, the two residual sums (7 x tokens x hidden), two dropout
    masks, the ReLU output (tokens x ffn), the boolean mask as float and the log-sum-exp of the fused
    attention, and per adapted linear its rank-r intermediate (plus its own input where no other op keeps it)."""
    c, t = shape.config, batch * seq
    hidden = t * c.hidden_size * shape.residual
    size = 7 * hidden + t * c.ffn_dim * shape.residual
    size += batch * seq * seq * shape.residual + batch * c.num_attention_heads * seq * 4
    if c.dropout:
        size += 2 * t * c.hidden_size * shape.mask
    inputs = {"q_proj": c.hidden_size, "k_proj": c.hidden_size, "v_proj": c.hidden_size,
              "out_proj": c.hidden_size, "fc1": c.hidden_size, "fc2": c.ffn_dim}
    for name in shape.targets_per_layer:
        size += t * shape.r * shape.adapter
        if name in ("out_proj", "fc1"):  # their inputs are otherwise kept by no one
            size += t * inputs[name] * shape.adapter
        if shape.lora_dropout:
            size += t * inputs[name] * (shape.adapter + shape.mask)
    return size


def activation_peak(shape: _Shape, batch: int, seq: int, checkpointed: int) -> tuple[int, int, int]:
    """(activations, dequantization buffers, their joint peak) for one training step with the first
    `checkpointed` decoder layers recomputed in backward.

    Three moments compete: the loss (unfused: its backward, with the log-softmax output, its gradient and the
    logits' gradient, all fp32 tokens x vocab, while the last layer's backward starts; fused: one chunk's fp32
    logits and log-probabilities beside the hidden states' gradient); the backward of the last kept layer (the
    gradients flowing through it, the dequantized weight); and that of the last recomputed layer, when the kept
    layers after it have been freed (its recomputed activations, gradients, dequantized weight).
    """
    c, t = shape.config, batch * seq
    hidden = t * c.hidden_size * shape.residual
    layer = _layer_bytes(shape, batch, seq)
    embed = t * c.hidden_size * shape.mask if c.dropout else 0
    embed += t * c.word_embed_proj_dim * shape.residual  # the final norm's output, kept by the head
    kept = embed + checkpointed * hidden + (c.num_hidden_layers - checkpointed) * layer
    if shape.fused_loss:
        head = t * c.word_embed_proj_dim * shape.residual + 8 * min(t, chunk_rows(c.vocab_size)) * c.vocab_size
    else:  # a 16-bit head's logits and their gradient are freed before this moment
        head = 3 * t * c.vocab_size * 4
    backward = 2 * hidden + t * c.ffn_dim * (shape.residual + shape.compute)
    recomputed = embed + checkpointed * hidden + layer + backward if checkpointed else 0
    dequant = shape.largest_quantized * (shape.state + (shape.compute if shape.state != shape.compute else 0))
    activations = max(kept + max(head, backward), recomputed)
    peak = max(kept + head, kept + backward + dequant, recomputed + dequant if checkpointed else 0)
    return activations, dequant, peak


# -- the plan ---------------------------------------------------------------------------------------------------
def _largest_shard(source: Any, config: OPTConfig, shard_size: int | None) -> int:
    """The biggest weight file the load maps at once: a folder's own, else the Hub's 10 GB fp16 shards."""
    if shard_size is not None:
        return shard_size
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = inspect_checkpoint(source)
        return max(f.stat().st_size for f in files.shards)
    fp16 = 2 * sum(p.numel() for p in meta_model(config, None).parameters())
    return min(HUB_SHARD_BYTES, fp16)


def plan_finetune(source: OPTConfig | str | os.PathLike, *, machine: Machine | str = "cpu",
                  gpu: str | int | None = None, host: str | int | None = None, bits: int = 4,
                  quant_type: str = "nf4", double_quant: bool = False, r: int = 8,
                  target_modules: list[str] | str = ("q_proj", "v_proj"), lora_dropout: float = 0.0,
                  optimizer: str = "adamw", batch: int = 4, seq: int = 256,
                  gradient_checkpointing: bool | int | str = True,
                  compute_dtype: torch.dtype | str | None = None, load_dtype: torch.dtype | str = torch.float32,
                  shard_size: int | str | None = None, half_head: bool = True,
                  fused_loss: bool = True) -> FinetunePlan:
    """The memory a `qopt.finetune` run needs on `machine` (a preset name, with `gpu` / `host` sizes overriding
    it), computed from a config (folder or size name) alone: `plan_from_configs` with its settings spelled as
    keywords (LoRA alpha 2 r). `bits`, `quant_type`, `double_quant` make the `QuantizationConfig`; `r`,
    `target_modules`, `lora_dropout` the `LoraConfig`; `optimizer` and `batch` the `TrainingArguments`.
    """
    box = machine if isinstance(machine, Machine) else machine_preset(machine, gpu, host)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got {batch} and {seq}")
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout,
                      target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules)
    training = TrainingArguments(output_dir="", optimizer=optimizer, batch_size=batch)
    return plan_from_configs(source, box, QuantizationConfig.from_bits(bits, quant_type, double_quant), lora,
                             training, seq=seq, gradient_checkpointing=gradient_checkpointing,
                             compute_dtype=compute_dtype, load_dtype=load_dtype, shard_size=shard_size,
                             half_head=half_head, fused_loss=fused_loss)


def plan_from_configs(source: OPTConfig | str | os.PathLike, machine: Machine, quant: QuantizationConfig | None,
                      lora: LoraConfig, training: TrainingArguments, *, seq: int = 256,
                      gradient_checkpointing: bool | int | str = True,
                      compute_dtype: torch.dtype | str | None = None, load_dtype: torch.dtype | str = torch.float32,
                      shard_size: int | str | None = None, half_head: bool = True,
                      fused_loss: bool = True) -> FinetunePlan:
    """The memory of a fine-tune of `source` (a config, folder or size name) with these settings on `machine`,
    before any weight is read: `quant` None for a 16-bit base; of `lora` the targets, rank and dropout count,
    of `training` the optimizer and batch size; `seq` tokens per row.

    `compute_dtype` (replacing `quant`'s) defaults to bfloat16, or float16 on a GPU without bfloat16 (colab-t4);
    `load_dtype` is the `torch_dtype` the base is loaded in (qopt finetune's default float32); it sets the
    dequantization buffers.
    `half_head`: a quantized base keeps its frozen tied head in the compute dtype, as `qopt.finetune` does;
    `fused_loss`: the loss is taken through the frozen head a chunk of tokens at a time, as it also does.
    `gradient_checkpointing="auto"` (qopt.finetune's default) recomputes only as many layers as keep the live
    tensors (weights, adapter, optimizer state, activation peak: what a GPU holds) within those of the standard
    recipe (PEFT's: every layer recomputed, fp32 head, loss from the full logits): the memory the fast path saves
    buys back recomputation. A number checkpoints that many layers, from the first.
    """
    config, label = config_for(source)
    box, batch, optimizer = machine, training.batch_size, training.optimizer
    r, lora_dropout = lora.r, lora.lora_dropout
    if seq < 1:
        raise ValueError(f"batch and seq must be positive, got {batch} and {seq}")
    if seq > config.max_position_embeddings:
        raise ValueError(f"seq {seq} exceeds {label}'s max_position_embeddings ({config.max_position_embeddings})")
    compute = _dtype(compute_dtype, "compute_dtype") if compute_dtype is not None else \
        (torch.bfloat16 if box.bf16 else torch.float16)
    load = _dtype(load_dtype, "load_dtype")
    if compute == torch.bfloat16 and not box.bf16:
        raise ValueError(f"compute_dtype bfloat16: the {box.name} GPU has no bfloat16 arithmetic; use float16")
    if quant is not None and quant.bnb_4bit_compute_dtype != compute:
        quant = replace(quant, bnb_4bit_compute_dtype=compute)
    model = meta_model(config, quant)
    # the weights as training holds them: quantized linears as the loader sizes them, the rest fp32 for QLoRA
    # (prepare_for_kbit_training) or the load dtype for a 16-bit base
    residual = torch.float32 if quant is not None else load
    weights = compute_module_sizes(sizing_view(model, residual), dtype=residual)[""]
    # the sizing view holds a quantized layer's bias in the compute dtype; prepare_for_kbit_training upcasts it
    weights += sum(m.bias.numel() * (_size(residual) - _size(compute)) for m in model.modules()
                   if is_quantized(m) and m.bias is not None)
    half_head = half_head and quant is not None and compute != torch.float32 and config.tie_word_embeddings
    if half_head:
        weights -= config.vocab_size * config.word_embed_proj_dim * (_size(residual) - _size(compute))
    loaded = compute_module_sizes(sizing_view(model, load), dtype=load)[""]
    quantized = [m.out_features * m.in_features for m in model.modules() if is_quantized(m)]
    largest = max(quantized, default=0)
    cuda = box.device == "cuda"
    linear_fp32 = 4 * sum(quantized)
    load_heap = 0 if cuda else int(CPU_HEAP_LOAD * linear_fp32)
    add_lora(model, replace(lora), dtype=torch.float32)  # a copy: add_lora fills in the config it is given
    layers = dict(lora_layers(model))
    shapes = [p.numel() for p in model.parameters() if p.requires_grad]
    trainable = sum(shapes)
    per_layer = sorted({n.rsplit(".", 1)[-1] for n in layers if ".layers.0." in n})
    shape = _Shape(config, _size(residual), _size(compute), _size(load), 4, 1 if cuda else _size(residual),
                   per_layer, r, lora_dropout, largest, fused_loss and "lm_head" not in layers)

    depth = config.num_hidden_layers

    def sizes(b: int, s: int, checkpointed: int) -> Sizes:
        act, dequant, peak = activation_peak(shape, b, s, checkpointed)
        kept = activation_peak(shape, b, s, 0)[0]  # what a step without recomputation keeps: the heap's basis
        share = (CPU_HEAP_TRAIN[True] * checkpointed + CPU_HEAP_TRAIN[False] * (depth - checkpointed)) / depth
        runtime = CUDA_CONTEXT_BYTES if cuda else int(CPU_HEAP_WEIGHTS * linear_fp32 + share * kept)
        return Sizes(weights, 4 * trainable, 4 * trainable, optimizer_bytes(shapes, optimizer), act, dequant, peak,
                     runtime)

    if gradient_checkpointing == "auto":
        standard = plan_from_configs(config, box, quant, lora, training, seq=seq, gradient_checkpointing=True,
                                     compute_dtype=compute, load_dtype=load, shard_size=shard_size,
                                     half_head=False, fused_loss=False)
        live = lambda sized: sized.total - sized.runtime  # noqa: E731  (what the tensors themselves hold)
        budget = live(standard.sizes)
        checkpointed = next((k for k in range(depth + 1) if live(sizes(batch, seq, k)) <= budget), depth)
    elif isinstance(gradient_checkpointing, bool):
        checkpointed = depth if gradient_checkpointing else 0
    elif isinstance(gradient_checkpointing, int) and 0 <= gradient_checkpointing <= depth:
        checkpointed = gradient_checkpointing  # the first N layers
    else:
        raise ValueError(f"gradient_checkpointing: expected True, False, 'auto' or a number of layers (0 to "
                         f"{depth}), got {gradient_checkpointing!r}")
    gradient_checkpointing = checkpointed > 0
    chosen = sizes(batch, seq, checkpointed)
    host: dict[str, int] = {"checkpoint shard (memory-mapped)": _largest_shard(source, config,
                                                                              None if shard_size is None
                                                                              else parse_size(shard_size))}
    if cuda:
        host["CUDA runtime"] = CUDA_HOST_BYTES
        host["largest unquantized tensor"] = max(p.numel() for p in model.parameters()) * _size(load)
    else:
        host["model being filled"] = loaded
        host["retained heap (glibc)"] = load_heap
    limit = box.gpu_bytes if cuda else box.host_bytes
    fits = lambda b, s: sizes(b, s, checkpointed).total <= limit  # noqa: E731
    return FinetunePlan(
        label=label, machine=box, quantization=quant.name if quant else f"16-bit ({str(load).removeprefix('torch.')})",
        compute_dtype=compute, optimizer=optimizer, r=r, targets=short_target_names(list(layers)),
        lora_layers=len(layers), trainable=trainable, batch=batch, seq=seq,
        gradient_checkpointing=gradient_checkpointing, checkpointed_layers=checkpointed, sizes=chosen,
        other_activations=sizes(batch, seq, 0 if gradient_checkpointing else depth).activations,
        half_head=half_head, host_load=host, decoder_layers=depth,
        kept_without_checkpointing=activation_peak(shape, batch, seq, 0)[0],
        largest_batch=largest_fitting(lambda b: fits(b, seq), 1 << 16),
        largest_seq=largest_fitting(lambda s: fits(batch, s), config.max_position_embeddings))


def largest_fitting(fits: Any, upper: int) -> int:
    """The largest n in [1, upper] with fits(n), for a predicate that holds up to some n and fails after it
    (0 if even 1 fails): a binary search."""
    if not fits(1):
        return 0
    low, high = 1, upper
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _dtype(value: torch.dtype | str, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES or not DTYPES[value].is_floating_point:
        raise ValueError(f"{name} {value!r}: expected bfloat16, float16 or float32")
    return DTYPES[value]
