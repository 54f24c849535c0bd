"""`qopt plan`: the memory plan of a model from its config alone, before any weight is read."""
from __future__ import annotations

import argparse

from .common import add_hub, add_parser


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
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence held in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--strategy", choices=("auto", "balanced", "balanced_low_0", "sequential"), default="auto",
                   help="how layers spread over the GPUs (accelerate's device-map strategies)")
    add_hub(p)
    p.add_argument("--read-bandwidth", metavar="RATE",
                   help="disk read rate for the time estimates of offloaded layers, e.g. 2GB/s (default: measured "
                        "in --offload-folder when the plan needs disk)")
    p.add_argument("--offload-folder", metavar="DIR", help="where offloaded layers would live (default: the temp "
                                                           "folder); the read rate is measured there")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
    result = plan(args.model, args.bits, memory or None, args.context, args.batch, quant_type=args.quant_type,
                  double_quant=args.double_quant, strategy=args.strategy)
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
            result.read_bandwidth = measure_read_bandwidth(folder)
            result.bandwidth_source = f"measured in {folder}"
    print(result.format())
    return 0 if result.loadable else 1
