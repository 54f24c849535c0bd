"""Decode benchmark: qopt's generate against transformers + bitsandbytes on the same random OPT checkpoints.

    .venv/bin/python evals/bench_decode.py                         # 125m and 350m; fp32, bf16, int8, nf4
    .venv/bin/python evals/bench_decode.py --sizes 125m,350m,1.3b --repeats 5

For each size an OPT-shaped checkpoint of random float16 weights (the released config) is written once to
--folder. For each precision both libraries load it the same way (non-quantized parts in bf16 for int8 / nf4,
nf4 computing in bf16), then take turns on the same prompt: greedy decoding of --new tokens after a --prompt
token prompt, batch 1, never stopping early (no end token). Decode tokens/s = (new - 1) / (time of a
--new-token generate - time of a 1-token generate); prefill tokens/s = prompt / time of one forward over the
prompt (cache on, logits of the last position only). Each figure is the median of --repeats runs; ratios are
ours / transformers' from the same run. Target (issue 4): decode ratio >= 1.5 for int8 and nf4 at 125m / 350m.
Take timings on a quiet machine: the load average is printed with the table. With other jobs running, two-thread
timings swing by 10x (OpenMP threads spin-waiting on shared cores); a single-threaded comparison is steadier:
`OMP_NUM_THREADS=1 ... --threads 1` (bitsandbytes' 4-bit kernel has its own OpenMP pool, which --threads
does not reach).
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qopt
from qopt.place.plan import config_for

MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
         "nf4": (torch.bfloat16, "nf4")}


def write_checkpoint(folder: Path, size: str) -> Path:
    """A random float16 OPT-`size` checkpoint (qopt's init: normal(0, 0.02) weights), written once."""
    folder = folder / f"opt-{size}-random"
    if (folder / "config.json").exists():
        return folder
    config, _ = config_for(f"opt-{size}")
    torch.manual_seed(0)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    model.half().save_pretrained(folder, max_shard_size="500MB")
    return folder


def load_ours(folder: Path, mode: str) -> torch.nn.Module:
    dtype, quantization = MODES[mode]
    return qopt.load(folder, torch_dtype=dtype, quantization=quantization, progress=False)


def load_peer(folder: Path, mode: str) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig, OPTForCausalLM

    dtype, quantization = MODES[mode]
    kwargs = {}
    if quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = OPTForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu" if quantization else None, **kwargs)
    model.generation_config.eos_token_id = None  # never stop early: every run makes exactly --new tokens
    return model.eval()


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: torch.nn.Module, ids: torch.Tensor, new: int, ours: bool) -> dict[str, float]:
    """One round: a prefill forward, a 1-token and a `new`-token greedy generate."""
    extra = {"eos_token_id": []} if ours else {}

    def generate(n: int) -> torch.Tensor:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             **extra)
        assert out.shape[1] == ids.shape[1] + n, f"generated {out.shape[1] - ids.shape[1]} tokens, not {n}"
        return out

    with torch.no_grad():
        prefill = timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
    one, full = timed(lambda: generate(1)), timed(lambda: generate(new))
    return {"prefill": ids.shape[1] / prefill, "decode": (new - 1) / (full - one)}


def bench_mode(folder: Path, mode: str, prompt: int, new: int, repeats: int) -> dict[str, dict[str, float]]:
    """Both libraries on one checkpoint and precision, taking turns; medians of `repeats` rounds."""
    ids = torch.randint(3, 50000, (1, prompt), generator=torch.Generator().manual_seed(0))
    models = {"qopt": load_ours(folder, mode), "transformers": load_peer(folder, mode)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: first-call repacks, allocator, oneDNN primitives
        measure(model, ids, 4, name == "qopt")
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(measure(model, ids, new, name == "qopt"))
    del models
    gc.collect()
    return {name: {key: statistics.median(r[key] for r in rs) for key in ("prefill", "decode")}
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="125m,350m", help="comma-separated OPT sizes (125m, 350m, 1.3b)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: fp32, bf16, int8, nf4")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "qopt-bench-decode",
                        help="where the random checkpoints are written (reused)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # bitsandbytes' int8 matmul logs a warning on every call; silenced for both libraries alike
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    rows = []
    for size in args.sizes.split(","):
        folder = write_checkpoint(args.folder, size)
        for mode in args.modes.split(","):
            result = bench_mode(folder, mode, args.prompt, args.new, args.repeats)
            ours, peer = result["qopt"], result["transformers"]
            rows.append((size, mode, ours["decode"], peer["decode"], ours["prefill"], peer["prefill"]))
            print(f"{size} {mode}: decode {ours['decode']:.1f} vs {peer['decode']:.1f} tok/s, "
                  f"prefill {ours['prefill']:.0f} vs {peer['prefill']:.0f} tok/s", flush=True)
    load = os.getloadavg()[0]
    print(f"\nbatch 1, prompt {args.prompt}, {args.new} new tokens greedy, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; torch {torch.__version__}; load average {load:.2f} on {os.cpu_count()} CPUs\n")
    print("| size | precision | qopt decode tok/s | transformers decode tok/s | decode ratio "
          "| qopt prefill tok/s | transformers prefill tok/s | prefill ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size, mode, od, pd, op, pp in rows:
        print(f"| {size} | {mode} | {od:.1f} | {pd:.1f} | {od / pd:.2f}x | {op:.0f} | {pp:.0f} | {op / pp:.2f}x |")


if __name__ == "__main__":
    main()
