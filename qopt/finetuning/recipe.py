"""The `qopt finetune` recipe: a checkpoint loaded (quantized for QLoRA), prepared for training, given a LoRA
adapter and trained on a text or JSONL file by `qopt.finetuning.trainer`.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from ..io.hub import resolve_model
from ..io.outputs import check_output_folder
from ..loading.loader import load
from ..model.config import OPTConfig
from ..model.network import OPTForCausalLM, OPTForSequenceClassification
from ..model.tokenizer import tokenizer_for
from ..place.ranks import check_one_device_per_rank
from ..quant.config import QuantizationConfig
from .data import classification_dataset, lm_dataset
from .fingerprint import base_fingerprint, data_fingerprint, run_fingerprint
from .lora import LoraConfig, add_lora
from .step_speedups import auto_checkpointing, fast_path
from .trainer import TrainingArguments, TrainResult, finished_run, train

logger = logging.getLogger(__name__)
# CPUs have no fast float16 matmuls: a LoRA fine-tune with fp16 autocast on a CPU ran 17 tokens/s against 907
# without it (53x slower), and a 256x1024 @ 1024x1024 matmul takes 1,048 ms in float16, 15 ms in float32 and
# 5.8 ms in bfloat16 on one thread; bfloat16 autocast has fast CPU kernels
FP16_ON_CPU = ("fp16=True on a CPU: CPUs have no fast float16 matmuls (measured 53x slower than without it); use "
               "bf16=True for 16-bit autocast on a CPU, or neither")
_warned: list[bool] = []


def warn_fp16_on_cpu(model: nn.Module, args: TrainingArguments) -> None:
    """Once per process: fp16 training on a CPU is legal but slow, and the reason is not obvious."""
    if args.fp16 and not _warned and all(p.device.type in ("cpu", "meta") for p in model.parameters()):
        _warned.append(True)
        logger.warning("warning: %s", FP16_ON_CPU)


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True) -> nn.Module:
    """PEFT's recipe for training adapters on a low-bit base.

    Freezes every weight, puts every non-quantized float tensor (norms, embedding, head, biases) in fp32 so
    the small updates LoRA makes are not lost to bf16 rounding, and with gradient checkpointing makes the
    embedding output require grad, so recomputed layers get gradients even though the embedding is frozen.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        enable_input_require_grads(model)
        model.gradient_checkpointing_enable()
    return model


def fp16_compute(quantization: Any) -> QuantizationConfig:
    """The quantization with float16 compute: fp16 training is for GPUs without bfloat16 (T4), where the
    quantized matmuls must not run in bfloat16 either."""
    config = copy.deepcopy(QuantizationConfig.coerce(quantization))
    config.bnb_4bit_compute_dtype = torch.float16
    return config


def enable_input_require_grads(model: nn.Module) -> None:
    if getattr(model, "_input_grads_hook", None) is None:
        hook = lambda _module, _inputs, output: output.requires_grad_(True)  # noqa: E731
        model._input_grads_hook = model.get_input_embeddings().register_forward_hook(hook)


# -- the `qopt finetune` composition ------------------------------------------------------------------------
TASKS = ("causal-lm", "seq-cls")


def finetune(model_path: str | Path, data: str | Path, args: TrainingArguments, lora: LoraConfig | None = None,
             *, task: str = "causal-lm", eval_data: str | Path | None = None, eval_fraction: float = 0.1,
             quantization: str | None = None, torch_dtype: str | torch.dtype | None = None,
             device_map: Any = None, max_memory: dict[Any, Any] | None = None, offload_folder: str | None = None,
             block_size: int | None = None, max_length: int | None = None,
             gradient_checkpointing: bool | str = "auto",
             adapter_dtype: torch.dtype = torch.float32, half_head: bool = True,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Load a checkpoint (quantized for QLoRA), add a LoRA adapter, train it on a text / JSONL file.

    Without `eval_data`, the last `eval_fraction` of the blocks (or examples) is held out for evaluation.
    `block_size` defaults to min(256, the model's context) and `max_length` to the model's context.
    `torch_dtype`, `device_map`, `max_memory` and `offload_folder` place the base model as `qopt.load` does.
    On a quantized base the frozen tied head stays in the 4-bit compute dtype (`half_head`; False: all fp32, as
    PEFT's recipe leaves it) and a causal LM's loss is taken through it without the full logits;
    `gradient_checkpointing="auto"` then recomputes only as many layers as keep the planned live tensors within
    those of PEFT's recipe with every layer recomputed (True: all layers, False: none).
    Re-run on the same output_dir, it resumes the checkpoint there if data, settings and base are unchanged
    (ResumeError otherwise; `args.resume=False` starts over) and returns a finished run's result untrained.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    if gradient_checkpointing not in (True, False, "auto"):
        raise ValueError(f"gradient_checkpointing: expected True, False or 'auto', got {gradient_checkpointing!r}")
    check_output_folder(args.output_dir, [model_path], adapter=True)  # before any work
    check_one_device_per_rank(device_map)  # under torchrun: one device per rank
    config = OPTConfig.from_pretrained(resolve_model(model_path).folder)  # a Hub id: its config from the cache
    block_size = block_size or min(256, config.max_position_embeddings)
    max_length = max_length or config.max_position_embeddings
    length = block_size if task == "causal-lm" else max_length
    if length > config.max_position_embeddings:
        raise ValueError(f"{'block_size' if task == 'causal-lm' else 'max_length'} {length} exceeds the "
                         f"model's max_position_embeddings ({config.max_position_embeddings})")
    tokenizer = tokenizer_for(model_path)
    overrides: dict[str, Any] = {}
    if task == "causal-lm":
        model_class: type = OPTForCausalLM
        train_set: Any = lm_dataset(data, tokenizer, block_size)
        eval_set: Any = lm_dataset(eval_data, tokenizer, block_size) if eval_data else None
    else:
        model_class = OPTForSequenceClassification
        train_set = classification_dataset(data, tokenizer, max_length)
        eval_set = classification_dataset(eval_data, tokenizer, max_length, train_set.label_names) \
            if eval_data else None
        overrides["num_labels"] = len(train_set.label_names)
    settings = {"task": task, "block_size" if task == "causal-lm" else "max_length": length,
                "eval_fraction": None if eval_data else eval_fraction, "quantization": quantization,
                "torch_dtype": torch_dtype, "adapter_dtype": adapter_dtype,
                "half_head": bool(quantization and half_head)}
    lora = lora or LoraConfig()
    fingerprint = run_fingerprint(base_fingerprint(model_path), lora, args,
                                  data_fingerprint(train=data, eval=eval_data), settings)
    finished = finished_run(Path(args.output_dir), fingerprint, args, int(os.environ.get("RANK", "0")) == 0)
    if finished is not None:  # checked before the model is loaded: a finished run costs nothing to repeat
        return finished
    if eval_set is None and eval_fraction:
        train_set, eval_set = train_set.split(eval_fraction)
    set_seed(args.seed)
    if quantization:
        overrides["quantization"] = fp16_compute(quantization) if args.fp16 else quantization
    model = load(model_path, model_class=model_class, torch_dtype=torch_dtype, progress=args.progress,
                 device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, **overrides)
    if quantization:
        prepare_for_kbit_training(model, bool(gradient_checkpointing))
    elif gradient_checkpointing:
        enable_input_require_grads(model)
        model.gradient_checkpointing_enable()
    warn_fp16_on_cpu(model, args)
    add_lora(model, lora, dtype=adapter_dtype)
    fast_path(model, half_head=bool(quantization and half_head))  # finetuning/step_speedups.py
    if gradient_checkpointing == "auto" and task == "causal-lm":
        model.gradient_checkpointing_enable(layers=auto_checkpointing(model, lora, args.batch_size, length,
                                                                      args.optimizer))
    return train(model, train_set, eval_set, args, on_step, fingerprint)
