"""`qopt plan`: the memory plan of a model from its config alone, before any weight is read."""
from __future__ import annotations

import argparse
import os
import sys

from .common import add_checkpointing, add_hub, add_parser, checkpointing


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "plan", "memory plan (weights per device, KV cache, activations, device map) from a "
                                "config alone, before any weight is read; exit 1 if the model cannot load")
    p.add_argument("model", help="config.json, checkpoint folder, a Hub id such as facebook/opt-1.3b (metadata only: "
                                 "config, index, shard headers), or a built-in size name such as opt-30b")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4, help="weight width of the linear layers")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--gpu", action="append", metavar="SIZE",
                   help="memory of a GPU, e.g. 24GiB or 24GB (repeat for GPUs 1, 2, ...)")
    p.add_argument("--cpu", metavar="SIZE",
                   help="CPU memory for weights, e.g. 64GiB; 0 for none (default: what this machine has free)")
    p.add_argument("--context", type=int, help="tokens per sequence held in the KV cache (default: 2048, or the "
                   "model's positions where it has fewer)")
    p.add_argument("--batch", type=int, help="sequences decoded at once (default 1; --finetune: rows per step, "
                   "default 4)")
    p.add_argument("--strategy", choices=("auto", "balanced", "balanced_low_0", "sequential"), default="auto",
                   help="how layers spread over the GPUs (accelerate's device-map strategies)")
    add_hub(p)
    p.add_argument("--read-bandwidth", metavar="RATE",
                   help="disk read rate for the time estimates of offloaded layers, e.g. 2GB/s (default: measured "
                        "in --offload-folder when the plan needs disk)")
    p.add_argument("--stream-from-host", action="store_true", help="decoder layers planned for the CPU stay in "
                   "its RAM but run on the GPU, copied over layer by layer (qopt.load(stream_from_host=True))")
    p.add_argument("--offload-folder", metavar="DIR", help="where offloaded layers would live (default: the temp "
                                                           "folder); the read rate is measured there")
    f = p.add_argument_group("fine-tuning (--finetune)")
    f.add_argument("--finetune", action="store_true", help="plan a LoRA / QLoRA fine-tune instead of inference: "
                   "weights, adapter, gradients, optimizer state, activations, host RAM during the load")
    f.add_argument("--machine", choices=("colab-t4", "rtx-24gb", "cpu"), default="cpu",
                   help="colab-t4: 15 GiB GPU without bf16, 12.7 GiB RAM; rtx-24gb: 24 GiB GPU, bf16, 32 GiB "
                        "RAM; cpu: this machine's RAM (--gpu / --cpu override the sizes)")
    f.add_argument("--seq", type=int, default=256, help="tokens per training sequence (qopt finetune's "
                   "--block-size)")
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                   help="module names, or 'all-linear'")
    f.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    f.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"), default="adamw",
                   help="AdamW with fp32 states, or bitsandbytes' 8-bit states")
    add_checkpointing(f)
    f.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the quantized matmuls (default: bfloat16, float16 on a GPU without bf16)")
    f.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32",
                   help="dtype the base is loaded in (qopt finetune's --dtype)")
    f.add_argument("--shard-size", metavar="SIZE", help="largest checkpoint file (default: a folder's own, else "
                   "10GB, the Hub's OPT shards)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.finetune:
        return run_finetune(args)
    from ..place.device_map import normalize_max_memory
    from ..io.hub import is_hub_id, resolve_model
    from ..place.plan import plan

    if "/" in args.model and is_hub_id(args.model):  # org/name: from the cache or the Hub, metadata only
        args.model = resolve_model(args.model, revision=args.revision)
    elif args.revision is not None:
        raise ValueError(f"--revision applies to a Hub id (org/name), not to {args.model}")
    rate = None
    if args.read_bandwidth:
        from ..place.bandwidth import parse_rate

        try:
            rate = parse_rate(args.read_bandwidth)
        except ValueError:
            raise ValueError(f"--read-bandwidth {args.read_bandwidth}: expected a positive rate such as 2GB/s or "
                             "500MiB/s") from None
    memory: dict[int | str, str | int] = {i: size for i, size in enumerate(args.gpu or [])}
    if args.cpu is not None:
        memory["cpu"] = args.cpu
    elif memory:  # GPUs given without --cpu: this machine's free RAM, as a load here would have
        memory["cpu"] = normalize_max_memory(None).get("cpu", 0)
    result = plan(args.model, args.bits, memory or None, args.context, args.batch or 1, quant_type=args.quant_type,
                  double_quant=args.double_quant, strategy=args.strategy, stream_from_host=args.stream_from_host)
    if not isinstance(args.model, str):
        from ..place.download_plan import download_plan

        print(download_plan(args.model, result, args.keep_download).format_text())
    if "disk" in map(str, result.device_map.values()):
        if rate:
            result.read_bandwidth, result.bandwidth_source = rate, "given"
        else:
            import tempfile

            from ..place.bandwidth import measure_read_bandwidth

            folder = args.offload_folder or tempfile.gettempdir()
            if not os.path.isdir(folder):  # as `qopt generate` does with the same flag
                os.makedirs(folder)
                print(f"created offload folder {folder}", file=sys.stderr)
            result.read_bandwidth = measure_read_bandwidth(folder)
            result.bandwidth_source = f"measured in {folder}"
    print(result.format())
    return 0 if result.loadable else 1


def run_finetune(args: argparse.Namespace) -> int:
    from ..finetuning.plan import plan_finetune

    if args.gpu and len(args.gpu) > 1:
        raise ValueError("--finetune plans one device per process: give one --gpu")
    targets = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    result = plan_finetune(args.model, machine=args.machine, gpu=args.gpu[0] if args.gpu else None, host=args.cpu,
                           bits=args.bits, quant_type=args.quant_type, double_quant=args.double_quant, r=args.r,
                           target_modules=targets, lora_dropout=args.lora_dropout, optimizer=args.optimizer,
                           batch=args.batch or 4, seq=args.seq,
                           gradient_checkpointing=checkpointing(args),
                           compute_dtype=args.compute_dtype, load_dtype=args.dtype, shard_size=args.shard_size)
    print(result.format())
    return 0 if result.fits else 1
