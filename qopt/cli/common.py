"""What several commands share: the MODEL argument, the precision, placement and output flags, and one
vocabulary of flag names across commands (older spellings stay as aliases).

Torch-free at import: `qopt --help` builds every parser, and importing torch alone takes about a second.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..place.strategies import STRATEGIES
from ..quant.presets import PRESETS

DEFAULT_MODEL_HELP = "checkpoint folder or Hub id such as facebook/opt-125m (default: the bundled model)"
DEVICE_MAPS = (*STRATEGIES, "cpu", "cuda", "cuda:N")
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default after its help (flags without a meaningful default say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or not action.help \
                or isinstance(action, argparse._StoreFalseAction):  # "--no-x (default: True)" reads backwards
            return action.help or ""
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with defaults in its help and `-v` accepted after the command too."""
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library logs")
    return parser


def model_path(path: str | None) -> str:
    """The MODEL argument: a folder or a Hub id, which the library resolves (HF cache first, then the Hub, with
    --revision / --no-keep-download where the command has them); none means the model that ships with qopt."""
    from ..bundled import bundled_model_dir

    return path if path else str(bundled_model_dir())


# -- precision ------------------------------------------------------------------------------------------------
def add_precision(parser: argparse.ArgumentParser, bits: tuple[int, ...], bits_help: str) -> None:
    """--bits / --quant-type / --double-quant, or one --quantization preset name instead."""
    g = parser.add_argument_group("precision")
    g.add_argument("--bits", type=int, choices=bits, help=bits_help)
    g.add_argument("--quant-type", choices=("nf4", "fp4"), help="4-bit format (default nf4)")
    g.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    g.add_argument("--quantization", choices=tuple(PRESETS), metavar="PRESET",
                   help=f"a preset instead of the three flags above: {', '.join(PRESETS)}")


def preset(args: argparse.Namespace) -> str | None:
    """The quantization preset the precision flags spell ("nf4-dq", "int8", ...); None for 16/32 bits or none."""
    if args.quantization:
        if args.bits or args.quant_type or args.double_quant:
            raise ValueError("--quantization names a preset: drop --bits, --quant-type and --double-quant")
        return args.quantization
    if (args.quant_type or args.double_quant) and args.bits != 4:
        raise ValueError("--quant-type and --double-quant apply to --bits 4")
    if args.bits == 8:
        return "int8"
    if args.bits == 4:
        return (args.quant_type or "nf4") + ("-dq" if args.double_quant else "")
    return None


# -- placement ------------------------------------------------------------------------------------------------
def add_placement(parser: argparse.ArgumentParser, dtype: bool = True, dtype_default: str = "auto",
                  stream: bool = True) -> None:
    g = parser.add_argument_group("placement (as in transformers' from_pretrained)")
    g.add_argument("--device-map", metavar="MAP",
                   help=f"{' | '.join(DEVICE_MAPS)}; default: auto on a machine with a GPU (GPU first, then CPU, "
                        "then --offload-folder), else cpu")
    g.add_argument("--max-memory", nargs="+", metavar="DEV=SIZE",
                   help="memory each device may hold for an auto / balanced / sequential map, e.g. 0=20GiB "
                        "cpu=30GiB (default: what each device has free)")
    g.add_argument("--offload-folder", metavar="DIR", help="folder for the decoder layers that fit nowhere else")
    if stream:
        g.add_argument("--stream-from-host", action="store_true",
                       help="decoder layers the map puts on the CPU stay in its RAM but run on the GPU, copied over "
                            "layer by layer (an auto map on a machine with a GPU)")
    g.add_argument("--context", type=int, metavar="N",
                   help="tokens per sequence an auto / balanced / sequential map keeps room for (KV cache, "
                        "activations), as qopt plan counts them; default: what the command needs (generate: prompt "
                        "+ new tokens; eval: the window length)")
    if not dtype:  # the command picks the dtype itself (eval: each precision's)
        parser.set_defaults(dtype="auto")
        return
    g.add_argument("--dtype", metavar="DTYPE", default=dtype_default,
                   help=f"dtype of the weights left unquantized: {', '.join(DTYPE_NAMES)} (auto: the checkpoint's; "
                        "float16 becomes bfloat16 for quantized models computing on a CPU)")


def parse_max_memory(items: list[str] | None) -> dict[int | str, int] | None:
    """["0=20GiB", "cpu=30GiB"] -> {0: bytes, "cpu": bytes}."""
    if not items:
        return None
    from ..utils import parse_size

    memory: dict[int | str, int] = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep or not device or not size:
            raise ValueError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. 0=20GiB or cpu=30GiB")
        device = device.strip().lower().removeprefix("cuda:")
        key: int | str = int(device) if device.isdigit() else device
        if not isinstance(key, int) and key not in ("cpu", "disk"):
            raise ValueError(f"--max-memory {item!r}: the device is a GPU index (0, 1, ...), cpu or disk")
        if key in memory:
            raise ValueError(f"--max-memory {item!r}: device {key} is given twice; give each device once")
        try:
            memory[key] = parse_size(size)
        except ValueError as err:
            raise ValueError(f"--max-memory {item!r}: {err}") from None
    return memory


def generation_budget(args: argparse.Namespace, where: dict[str, Any], context: int | None,
                      batch: int = 1, all_logits: bool = False) -> dict[str, Any]:
    """`qopt.load`'s `context` / `batch` for a planned map (`where`: from `placement`): --context, else what the
    command needs (None: the model's positions, which the load reads from config.json itself); nothing for a
    single device, which plans nothing. `all_logits`: perplexity scores every position of a window."""
    if where["device_map"] not in STRATEGIES:
        return {}
    budget = {"context": args.context if args.context is not None else context, "batch": batch}
    return {**budget, "all_logits": True} if all_logits else budget


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """`qopt.load` keyword arguments from the placement flags: the GPU by default where there is one."""
    import torch

    device_map = args.device_map
    if device_map is None:
        device_map = "auto" if torch.cuda.is_available() else None
        from ..place.ranks import local_rank, world_size

        if device_map == "auto" and world_size() > 1:  # torchrun / accelerate launch: a whole copy per rank
            device_map = f"cuda:{local_rank()}"
    elif device_map not in DEVICE_MAPS[:4] and device_map not in ("cpu", "cuda") \
            and not (device_map.startswith("cuda:") and device_map[5:].isdigit()):
        raise ValueError(f"--device-map {device_map!r}: expected one of {', '.join(DEVICE_MAPS)}")
    memory = parse_max_memory(args.max_memory)
    single_device = device_map in (None, "cpu", "cuda") or str(device_map).startswith("cuda:")
    if memory is not None and single_device:
        raise ValueError("--max-memory plans an auto / balanced / sequential --device-map; a single device takes "
                         "no memory limits")
    if args.dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    where = {"device_map": device_map, "max_memory": memory, "offload_folder": args.offload_folder,
             "torch_dtype": args.dtype}
    if getattr(args, "stream_from_host", False):
        where["stream_from_host"] = True
    return where


# -- models from the Hub --------------------------------------------------------------------------------------
def add_hub(parser: argparse.ArgumentParser) -> None:
    """--revision and --no-keep-download for a MODEL given as a Hub id (token, cache and endpoint come from
    HF_TOKEN, HF_HUB_CACHE / HF_HOME and HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the cache alone)."""
    g = parser.add_argument_group("models from the Hugging Face Hub")
    g.add_argument("--revision", metavar="REV", help="branch, tag or commit of a Hub model (default: main)")
    g.add_argument("--no-keep-download", dest="keep_download", action="store_false",
                   help="stream the shards through a scratch folder, at most two at a time, each deleted once read, "
                        "instead of keeping them in the HF cache (default: keep them in the cache)")


def hub_options(args: argparse.Namespace) -> dict[str, Any]:
    """`qopt.load` keyword arguments from the Hub flags."""
    return {"revision": args.revision, "keep_download": args.keep_download}


# -- outputs --------------------------------------------------------------------------------------------------
def add_checkpointing(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--gradient-checkpointing auto|on|off` (qopt.finetune's `gradient_checkpointing`), one spelling for
    `qopt finetune` and `qopt plan --finetune`."""
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="recompute layers in backward: auto (default) recomputes only as many as keep the "
                        "planned tensors within PEFT's recipe with all recomputed; on: all; off: none (fastest)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="--gradient-checkpointing off")


def checkpointing(args: argparse.Namespace) -> bool | str:
    if args.no_gradient_checkpointing:
        return False
    return {"auto": "auto", "on": True, "off": False}[args.gradient_checkpointing]


def add_output(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    parser.add_argument("-o", "--output", "--out", dest="output", required=required, metavar="DIR", help=help)


def writable_file(path: str | None, flag: str) -> None:
    """Before any work starts: create the missing folders above an output (file or folder), saying so on
    stderr, as every command does; refuse one that cannot be written."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True)  # an OSError (a file in the way, no permission) is the one-line error
        print(f"qopt: created folder {parent} for {flag} {path}", file=sys.stderr)
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: folder {parent} is not writable")


# -- load progress --------------------------------------------------------------------------------------------
def show_bars() -> bool:
    """Progress bars go to a terminal; a log or a pipe gets one summary line per load instead."""
    return sys.stderr.isatty()


def start_load(args: argparse.Namespace, model: str) -> float:
    """The first line on a terminal, printed before the heavy imports (torch, bitsandbytes: seconds) so a
    user sees at once that the command runs; returns the start time for `end_load`."""
    if show_bars():
        print(f"qopt {args.command}: loading {model} ...", file=sys.stderr, flush=True)
    return time.perf_counter()


def end_load(args: argparse.Namespace, model: Any, name: str, began: float) -> None:
    """One line on stderr once the model is in: how long it took and where its weights are."""
    from ..evaluation.footprint import weight_footprint
    from ..utils import format_bytes

    foot = weight_footprint(model)
    places = ", ".join(f"{format_bytes(n)} {place}" for place, n in foot.where.items())
    print(f"qopt {args.command}: loaded {name} in {time.perf_counter() - began:.1f} s "
          f"({format_bytes(foot.bytes)} of weights: {places})", file=sys.stderr, flush=True)


def local_folder(path: str, revision: str | None = None) -> Path | None:
    """The folder whose config.json and tokenizer can be read before the load: the MODEL folder, or a Hub
    model's snapshot already in the HF cache (no network); None when only the download would tell."""
    from ..io.hub import cached_folder

    folder = Path(path).expanduser()
    return folder if folder.is_dir() else cached_folder(path, revision)


def check_positions(folder: Path, tokens: int, new_tokens: int, what: str = "the prompt") -> None:
    """A prompt that cannot fit the model's positions fails before the load, from config.json."""
    from ..model.config import OPTConfig

    limit = OPTConfig.from_pretrained(folder).max_position_embeddings
    if tokens + new_tokens > limit:
        raise ValueError(f"{what} is {tokens} tokens + --max-new-tokens {new_tokens} = {tokens + new_tokens} "
                         f"positions, more than the model's {limit} (max_position_embeddings in {folder}/config.json); "
                         f"shorten the prompt or lower --max-new-tokens")
