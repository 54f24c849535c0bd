"""`qopt finetune`: a LoRA / QLoRA adapter trained on a text or JSONL file."""
from __future__ import annotations

import argparse

from .common import (
    DEFAULT_MODEL_HELP,
    add_checkpointing,
    add_output,
    add_parser,
    add_placement,
    add_precision,
    checkpointing,
    model_path,
    placement,
    preset,
    start_load,
    writable_file,
)

# library argument -> this command's flag, in error messages
API_FLAGS = {"resume=False": "--no-resume", "max_steps": "--steps", "block_size": "--block-size",
             "max_length": "--max-length"}


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "finetune", "train a LoRA / QLoRA adapter on a text or JSONL file (PEFT format)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--data", required=True, metavar="FILE",
                   help="training data: .txt, or .jsonl with 'text' (and 'label')")
    add_output(p, "folder for the adapter, its checkpoint and training log")
    p.add_argument("--task", choices=("causal-lm", "seq-cls"), default="causal-lm",
                   help="causal-lm: next-token loss on packed blocks; seq-cls: a classifier head on 'label'")
    p.add_argument("--eval-data", metavar="FILE", help="evaluation file (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    add_precision(p, (4, 8), "QLoRA: train on a 4-bit (--quant-type) or LLM.int8 base (default: unquantized)")
    add_placement(p, dtype_default="float32", stream=False)
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8, help="rank of the adapter matrices")
    g.add_argument("--alpha", type=float, default=16, help="scale: the update is multiplied by alpha / r")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    g.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                   help="module names, or 'all-linear' for every Linear of the decoder layers")
    g.add_argument("--bias", choices=("none", "all", "lora_only"), default="none",
                   help="which biases train: none, all, or those of the adapted layers")
    g.add_argument("--modules-to-save", nargs="+", help="modules trained in full and saved (e.g. score)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--init", choices=("default", "gaussian"), default="default", help="LoRA A initialisation")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=4, help="rows per process and micro-step")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    t.add_argument("--scheduler", choices=("linear", "cosine", "constant"), default="linear",
                   help="learning-rate decay after the warmup")
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"), default="adamw",
                   help="AdamW with fp32 states, or bitsandbytes' 8-bit states (paged on a GPU)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--block-size", type=int, help="causal LM: tokens per packed block (default: min(256, context))")
    t.add_argument("--max-length", type=int, help="seq-cls: tokens kept per example (default: the context)")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (and at the end)")
    t.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (and at start and end)")
    t.add_argument("--eval-batches", type=int, help="cap on evaluation batches")
    t.add_argument("--seed", type=int, default=0, help="seeds data order, dropout and initialisation")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    t.add_argument("--fp16", action="store_true", help="float16 autocast and compute with loss scaling, for GPUs "
                   "without bfloat16 (e.g. a T4)")
    add_checkpointing(t)
    t.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has a "
                   "checkpoint (of this run or another)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    writable_file(args.output, "--output")
    start_load(args, model_path(args.model))
    from ..finetuning.lora import ALL_LINEAR, LoraConfig
    from ..finetuning.recipe import finetune
    from ..finetuning.trainer import TrainingArguments

    targets = ALL_LINEAR if args.target_modules == [ALL_LINEAR] else args.target_modules
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                      bias=args.bias, modules_to_save=args.modules_to_save, use_rslora=args.rslora,
                      init_lora_weights="gaussian" if args.init == "gaussian" else True)
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler=args.scheduler,
        warmup_steps=args.warmup, optimizer=args.optimizer, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, save_steps=args.save_steps, eval_steps=args.eval_steps,
        eval_batches=args.eval_batches, seed=args.seed, bf16=args.bf16, fp16=args.fp16, resume=not args.no_resume,
        progress=not args.no_progress)
    result = finetune(model_path(args.model), args.data, training, lora, task=args.task,
                      eval_data=args.eval_data, eval_fraction=args.eval_fraction, quantization=preset(args),
                      block_size=args.block_size, max_length=args.max_length, **placement(args),
                      gradient_checkpointing=checkpointing(args))
    if result.is_main_process:
        print(result.summary())
        print(f"adapter {'in' if result.already_done else 'written to'} {args.output} (PEFT format)")
    return 0
