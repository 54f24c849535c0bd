"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library modules.

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets `handler`;
`main` prints any `QoptError` (or bad-argument `ValueError`) as one line and exits 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import QoptError

DEFAULT_MODEL_HELP = "checkpoint folder (default: the bundled model)"


def _model_path(path: str | None) -> str:
    """The MODEL argument; none means the model that ships with qopt."""
    from .bundled import bundled_model_dir

    return path if path else str(bundled_model_dir())


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions and the bundled files")
    p.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> int:
    import torch

    from .bundled import bundled_model_dir, bundled_tokenizer_dir, wikitext2_test_path

    print(f"qopt {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for label, path in (("bundled model", bundled_model_dir()), ("tokenizer", bundled_tokenizer_dir()),
                        ("WikiText-2 test", wikitext2_test_path())):
        print(f"{label:16s} {path}{'' if path.exists() else '  (missing)'}")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qopt", description="OPT language models in low-bit precision.")
    parser.add_argument("--version", action="version", version=f"qopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.handler(args) or 0)
    except (QoptError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"qopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qopt {args.command}: interrupted", file=sys.stderr)
        return 130


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .report import DEFAULT_PRECISIONS, DEFAULT_TOLERANCE

    p = sub.add_parser("eval", help="WikiText-2 perplexity at one precision, all of them (--compare), or the "
                                    "regression gate (--check)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--compare", action="store_true", help="measure several precisions side by side")
    p.add_argument("--precisions", nargs="+", metavar="P",
                   help=f"with --compare (default: {' '.join(DEFAULT_PRECISIONS)}); add -calibrated to a "
                        "quantized one (nf4-calibrated) for GPTQ rounding on the shipped calibration sample")
    p.add_argument("--bits", type=int, choices=(32, 16, 8, 4),
                   help="one precision: 32 = fp32, 16 = bf16 (default), 8 = LLM.int8, 4 = --quant-type")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), help="4-bit format (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--seqlen", type=int, help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, help="overlapping windows; each scores its last STRIDE tokens")
    p.add_argument("--windows", type=int, metavar="N", help="measure only the first N windows")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE", help="write perplexity against weight memory as PNG")
    p.add_argument("--check", metavar="BASELINE",
                   help="re-run the baseline's settings; exit 1 if a perplexity moved beyond its tolerance")
    p.add_argument("--write-baseline", metavar="FILE", help="save this run as a gate baseline")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"relative tolerance stored by --write-baseline (default {DEFAULT_TOLERANCE})")
    p.add_argument("--max-gap-ratio", type=float, metavar="R",
                   help="stored by --write-baseline: each calibrated precision's gap to its reference must stay "
                        "at most R x its round-to-nearest preset's gap (e.g. 0.5)")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from . import report as rp

    if args.check:
        given = [f"--{k.replace('_', '-')}" for k in ("compare", "precisions", "bits", "quant_type", "double_quant",
                                                       "seqlen", "stride", "windows", "max_gap_ratio")
                 if getattr(args, k)]
        if given:
            raise ValueError(f"--check re-runs the settings stored in {args.check}; drop {' '.join(given)}")
        baseline, tolerance = rp.read_baseline(args.check)
        result = rp.rerun_baseline(baseline, args.model)
    else:
        if (args.quant_type or args.double_quant) and args.bits != 4:
            raise ValueError("--quant-type and --double-quant apply to --bits 4")
        if args.max_gap_ratio is not None and not args.write_baseline:
            raise ValueError("--max-gap-ratio is stored in a baseline: use it with --write-baseline")
        if args.bits and (args.compare or args.precisions):
            raise ValueError("--bits picks one precision; with --compare, list them with --precisions")
        model = _model_path(args.model)
        four = (args.quant_type or "nf4") + ("-dq" if args.double_quant else "")
        single = {32: "fp32", 16: "bf16", 8: "int8", 4: four}[args.bits or 16]
        if args.bits is None:
            single = rp.stored_precision(model) or single  # a pre-quantized checkpoint is measured as saved
        compare = args.compare or bool(args.precisions)
        precisions = (args.precisions or rp.DEFAULT_PRECISIONS) if compare else [single]
        result = rp.compare_precisions(model, precisions, args.seqlen, args.windows, args.stride,
                                       reference=compare)
    print(result.to_markdown())
    if args.json:
        result.save_json(args.json)
    if args.plot:
        result.save_plot(args.plot)
    if args.write_baseline:
        limits = rp.Tolerance(args.tolerance, args.max_gap_ratio)
        rp.write_baseline(result, args.write_baseline, limits)
        print(f"baseline written to {args.write_baseline} (tolerance {limits.describe()})")
    if not args.check:
        return 0
    problems = rp.check_baseline(result, baseline, tolerance)
    for problem in problems:
        print(f"qopt eval: gate: {problem}", file=sys.stderr)
    print(f"gate {args.check}: " + (f"{len(problems)} violation(s)" if problems else
                                    f"all {len(baseline.rows)} perplexities within {tolerance.describe()}"))
    return 1 if problems else 0


SUBCOMMANDS.append(_add_eval)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="train a LoRA / QLoRA adapter on a text or JSONL file (PEFT format)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--data", required=True, help="training data: .txt, or .jsonl with 'text' (and 'label')")
    p.add_argument("--output", required=True, help="folder for the adapter, its checkpoint and training log")
    p.add_argument("--task", choices=("causal-lm", "seq-cls"), default="causal-lm")
    p.add_argument("--eval-data", help="evaluation file (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--quantization", choices=("nf4", "fp4", "nf4-dq", "fp4-dq", "int8"),
                   help="QLoRA: train on a quantized base (default: the base in --dtype)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="dtype of the unquantized weights")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16)
    g.add_argument("--dropout", type=float, default=0.05)
    g.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                   help="module names, or 'all-linear' for every Linear of the decoder layers")
    g.add_argument("--bias", choices=("none", "all", "lora_only"), default="none")
    g.add_argument("--modules-to-save", nargs="+", help="modules trained in full and saved (e.g. score)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--init", choices=("default", "gaussian"), default="default", help="LoRA A initialisation")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=4, help="rows per process and micro-step")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--scheduler", choices=("linear", "cosine", "constant"), default="linear")
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"), default="adamw")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--block-size", type=int, help="causal LM: tokens per packed block (default: min(256, context))")
    t.add_argument("--max-length", type=int, help="seq-cls: tokens kept per example (default: the context)")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (and at the end)")
    t.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (and at start and end)")
    t.add_argument("--eval-batches", type=int, help="cap on evaluation batches")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    t.add_argument("--no-gradient-checkpointing", action="store_true")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has a checkpoint")
    t.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from .lora import ALL_LINEAR, LoraConfig
    from .training import TrainingArguments, finetune

    targets = ALL_LINEAR if args.target_modules == [ALL_LINEAR] else args.target_modules
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                      bias=args.bias, modules_to_save=args.modules_to_save, use_rslora=args.rslora,
                      init_lora_weights="gaussian" if args.init == "gaussian" else True)
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler=args.scheduler,
        warmup_steps=args.warmup, optimizer=args.optimizer, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, save_steps=args.save_steps, eval_steps=args.eval_steps,
        eval_batches=args.eval_batches, seed=args.seed, bf16=args.bf16, resume=not args.no_resume,
        progress=not args.no_progress)
    result = finetune(_model_path(args.model), args.data, training, lora, task=args.task,
                      eval_data=args.eval_data, eval_fraction=args.eval_fraction, quantization=args.quantization,
                      torch_dtype=args.dtype, block_size=args.block_size, max_length=args.max_length,
                      gradient_checkpointing=not args.no_gradient_checkpointing)
    if result.is_main_process:
        print(result.summary())
        print(f"adapter written to {args.output} (PEFT format)")
    return 0


SUBCOMMANDS.append(_add_finetune)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory plan (weights per device, KV cache, activations, device map) from a "
                                    "config alone, before any weight is read")
    p.add_argument("model", help="config.json, checkpoint folder, or a size name such as opt-30b")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--gpu", action="append", metavar="SIZE",
                   help="memory of a GPU, e.g. 24GiB (repeat for GPUs 1, 2, ...)")
    p.add_argument("--cpu", metavar="SIZE", help="CPU memory for weights, e.g. 64GiB")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence held in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--strategy", choices=("auto", "balanced", "balanced_low_0", "sequential"), default="auto")
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from .planning import plan

    memory: dict | None = {i: size for i, size in enumerate(args.gpu or [])}
    if args.cpu:
        memory["cpu"] = args.cpu
    result = plan(args.model, args.bits, memory or None, args.context, args.batch, quant_type=args.quant_type,
                  double_quant=args.double_quant, strategy=args.strategy)
    print(result.format())
    return 0


SUBCOMMANDS.append(_add_plan)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a pre-quantized checkpoint (bitsandbytes layout, loads in "
                                        "transformers too)")
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--method", choices=QUANTIZE_METHODS, default="rtn",
                   help="rtn: round to nearest while streaming the checkpoint; calibrated: GPTQ rounding on "
                        "calibration text, one decoder layer at a time")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the tensors left unquantized (embeddings, norms, biases)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB")
    p.set_defaults(handler=_quantize)


QUANTIZE_METHODS = ["rtn"]


def _quantize_preset(args: argparse.Namespace) -> str:
    """The preset name (int8, nf4, fp4-dq, ...) that --bits / --quant-type / --double-quant spell."""
    if args.bits == 8 and (args.double_quant or args.quant_type != "nf4"):
        raise ValueError("--quant-type and --double-quant apply to --bits 4")
    return "int8" if args.bits == 8 else args.quant_type + ("-dq" if args.double_quant else "")


def _quantize(args: argparse.Namespace) -> int:
    from .loading import quantize_checkpoint
    from .quantization import QuantizationConfig

    config = QuantizationConfig.from_name(_quantize_preset(args))
    layers, nbytes = quantize_checkpoint(_model_path(args.model), args.out, config, torch_dtype=args.dtype,
                                         max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {config.name}, {layers} quantized layers, {nbytes / 2**20:.1f} MiB of weights")
    return 0


SUBCOMMANDS.append(_add_quantize)


def _add_quantize_calibrated(sub: argparse._SubParsersAction) -> None:
    """`qopt quantize --method calibrated` (GPTQ rounding) and `--budget` (mixed precision) on the quantize parser."""
    p = sub.choices["quantize"]
    p.add_argument("--budget", help="memory budget of the whole model, e.g. 16GiB: the linears most sensitive to "
                                    "4-bit rounding stay in --high-bits while it fits (4-bit base only)")
    p.add_argument("--high-bits", type=int, choices=(8, 16), default=8,
                   help="width of the linears kept out of 4-bit under --budget (16 also loads in transformers)")
    p.add_argument("--calibration-data", help="text file to calibrate on (default: the shipped sample of "
                                              "WikiText-2 train and public-domain prose)")
    p.add_argument("--calibration-windows", type=int, default=128, help="random token windows to calibrate on")
    p.add_argument("--calibration-seqlen", type=int, help="tokens per window (default: the model's context)")
    p.set_defaults(handler=_quantize_calibrated)


QUANTIZE_METHODS.append("calibrated")


def _quantize_calibrated(args: argparse.Namespace) -> int:
    if args.method == "rtn" and args.budget is None:
        return _quantize(args)
    from pathlib import Path

    from .calibration import CalibrationConfig, calibrate_checkpoint
    from .loading import quantize_checkpoint
    from .quantization import QuantizationConfig
    from .sensitivity import plan_for_checkpoint

    quant = QuantizationConfig.from_name(_quantize_preset(args))
    path = _model_path(args.model)
    text = Path(args.calibration_data).read_text(encoding="utf-8") if args.calibration_data else None
    if args.budget is not None:
        if args.bits != 4:
            raise ValueError("--budget mixes 4-bit with --high-bits linears: use it with --bits 4")
        plan = plan_for_checkpoint(path, args.budget, quant, args.high_bits, text=text,
                                   seqlen=args.calibration_seqlen)
        quant = plan.quantization
        print(f"budget {plan.budget_bytes / 2**20:.1f} MiB: {len(plan.promoted())} linears in {args.high_bits}-bit, "
              f"the rest in {quant.name}; model {plan.total_bytes / 2**20:.1f} MiB "
              f"(all 4-bit: {plan.all_4bit_bytes / 2**20:.1f} MiB)")
    if args.method == "rtn":
        layers, nbytes = quantize_checkpoint(path, args.out, quant, torch_dtype=args.dtype,
                                             max_shard_size=args.max_shard_size)
        print(f"wrote {args.out}: {layers} quantized layers, {nbytes / 2**20:.1f} MiB of weights")
        return 0
    import torch

    config = CalibrationConfig(quantization=quant, dtype=getattr(torch, args.dtype))
    report = calibrate_checkpoint(path, args.out, config, text=text, count=args.calibration_windows,
                                  seqlen=args.calibration_seqlen, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {report.summary()}")
    return 0


SUBCOMMANDS.append(_add_quantize_calibrated)



def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with the model (greedy unless told to sample)")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help=f"the prompt, after an optional {DEFAULT_MODEL_HELP}")
    p.add_argument("--bits", type=int, choices=(4, 8, 16),
                   help="4 = --quant-type, 8 = LLM.int8, 16 = bf16 (default: as saved, float in bf16)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format (default nf4)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true", help="sample (implied by --temperature / --top-p)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, help="sampling: keep the k likeliest tokens (default 50; 0 = all)")
    p.add_argument("--top-p", type=float, help="sampling: keep the smallest set with this probability mass")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    import qopt

    from .generation import generate_text
    from .report import model_tokenizer

    if len(args.words) > 2:
        raise ValueError(f"expected [MODEL] PROMPT, got {len(args.words)} arguments; quote the prompt")
    path = _model_path(args.words[0] if len(args.words) == 2 else None)
    quantization = {4: args.quant_type, 8: "int8", 16: None, None: None}[args.bits]
    model = qopt.load(path, quantization=quantization, torch_dtype="bfloat16", progress=False)
    tokenizer = model_tokenizer(path) or qopt.OPTTokenizer.from_pretrained()
    options = {"top_k": args.top_k, "temperature": args.temperature, "top_p": args.top_p}
    sample = args.do_sample or args.temperature is not None or args.top_p is not None
    prompt = args.words[-1]
    print(prompt, end="", flush=True)
    texts = generate_text(model, tokenizer, prompt, on_text=(lambda t: print(t, end="", flush=True)) if args.stream
                          else None, max_new_tokens=args.max_new_tokens, do_sample=sample, num_beams=args.num_beams,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          **{k: v for k, v in options.items() if v is not None})
    print("" if args.stream else texts[0])
    return 0


SUBCOMMANDS.append(_add_generate)


if __name__ == "__main__":
    sys.exit(main())
