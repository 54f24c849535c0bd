"""Decode benchmark: qopt's generate against transformers + bitsandbytes on the same random OPT checkpoints.

    .venv/bin/python evals/bench_decode.py                         # 125m and 350m; fp32, bf16, int8, nf4
    .venv/bin/python evals/bench_decode.py --sizes 125m,350m,1.3b --repeats 5
    .venv/bin/python evals/bench_decode.py --quick                 # every kind end to end in about a minute

Checkpoints (--kinds): `random`, for each size an OPT-shaped checkpoint of random float16 weights (the released
config), written once to --folder; `outliers`, the same weights with OPT-style outlier dimensions planted (the
recipe, fixed before measuring: 6 hidden dimensions, the first 6 of `torch.randperm(hidden)` with seed 0, of
every `self_attn_layer_norm` / `final_layer_norm` weight set to 40, as OPT-6.7B and up have a handful of
dimensions with large layer-norm gains), so LLM.int8's outlier path runs as on a real large OPT; `bundled`, the
trained model shipped in qopt/data/model (one size). For each checkpoint the share of linear-layer input rows
with an activation above the LLM.int8 threshold (6.0) over one greedy generate of the benchmark's prompt is
printed and recorded: random weights never reach it, which leaves only int8's outlier-free branch to time. The
prompt is --prompt tokens of WikiText-2 test. For each precision both libraries load it the same way
(non-quantized parts in bf16 for int8 / nf4,
nf4 computing in bf16), then take turns on the same prompt: greedy decoding of --new tokens after a --prompt
token prompt, batch 1, never stopping early (no end token). Decode tokens/s = (new - 1) / (time of a
--new-token generate - time of a 1-token generate); prefill tokens/s = prompt / time of one forward over the
prompt (cache on, logits of the last position only). Each figure is the median of --repeats runs; ratios are
ours / transformers' from the same run. Target: decode ratio >= 1.5 for int8 and nf4 at 125m / 350m, on the
outlier checkpoints too. Every run goes into the JSON (evals/results/bench_decode.json; --quick:
evals/results/quick/)
with the machine's record (evals/results_meta.py).
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
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qopt
from qopt.bundled import bundled_model_dir
from qopt.place.plan import config_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_meta  # noqa: E402

MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
         "nf4": (torch.bfloat16, "nf4")}


OUTLIER_DIMS, OUTLIER_GAIN = 6, 40.0  # the planted-outlier recipe (module docstring), fixed before measuring
THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)


def outlier_dims(hidden: int) -> list[int]:
    return sorted(torch.randperm(hidden, generator=torch.Generator().manual_seed(0))[:OUTLIER_DIMS].tolist())


def write_checkpoint(folder: Path, size: str, kind: str = "random") -> Path:
    """A random float16 OPT-`size` checkpoint (qopt's init: normal(0, 0.02) weights), written once; `outliers`
    plants the outlier dimensions in every layer norm's weight; `bundled` is the shipped trained model."""
    if kind == "bundled":
        return bundled_model_dir()
    folder = folder / f"opt-{size}-{kind}"
    if (folder / "config.json").exists():
        return folder
    config, _ = config_for(f"opt-{size}")
    torch.manual_seed(0)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    if kind == "outliers":
        dims = outlier_dims(config.hidden_size)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("self_attn_layer_norm.weight", "final_layer_norm.weight")):
                    param[dims] = OUTLIER_GAIN
    model.half().save_pretrained(folder, max_shard_size="500MB")
    return folder


def outlier_share(folder: Path, ids: torch.Tensor, new: int) -> dict[str, int]:
    """Rows of the decoder linears' inputs (one per token per linear) with |x| > THRESHOLD anywhere, over one
    greedy generate of `new` tokens in bf16: what LLM.int8 decomposes in the benchmark's own run."""
    model = qopt.load(folder, torch_dtype=torch.bfloat16, progress=False)
    counts = {"rows": 0, "rows_above": 0}

    def count(_module: torch.nn.Module, args: tuple) -> None:
        rows = args[0].reshape(-1, args[0].shape[-1])
        counts["rows"] += rows.shape[0]
        counts["rows_above"] += int((rows.abs() > THRESHOLD).any(dim=-1).sum())

    hooks = [m.register_forward_pre_hook(count) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                       eos_token_id=[])
    for hook in hooks:
        hook.remove()
    return counts


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


def prompt_ids(prompt: int) -> torch.Tensor:
    """`prompt` tokens of WikiText-2 test (from token 1,000), batch 1."""
    from qopt.evaluation.perplexity import text_ids

    return text_ids().view(-1)[1000:1000 + prompt].view(1, -1).clone()


def bench_mode(folder: Path, mode: str, prompt: int, new: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    """Both libraries on one checkpoint and precision, taking turns; every round's figures."""
    ids = prompt_ids(prompt)
    models = {"qopt": load_ours(folder, mode), "transformers": load_peer(folder, mode)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: first-call repacks, allocator, oneDNN primitives
        measure(model, ids, 4, name == "qopt")
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(measure(model, ids, new, name == "qopt"))
    del models
    gc.collect()
    return runs


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in ("prefill", "decode")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="125m,350m", help="comma-separated OPT sizes (125m, 350m, 1.3b)")
    parser.add_argument("--kinds", default="random,outliers,bundled", help="comma-separated: random, outliers, "
                        "bundled")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: fp32, bf16, int8, nf4")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "qopt-bench-decode",
                        help="where the random checkpoints are written (reused)")
    parser.add_argument("--quick", action="store_true", help="125m, int8 and nf4, 8 new tokens, one round; "
                        "writes evals/results/quick/bench_decode.json")
    parser.add_argument("--json", type=Path, help="default: evals/results[/quick]/bench_decode.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.modes, args.new, args.prompt, args.repeats = "125m", "int8,nf4", 8, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    record = results_meta.meta("quick" if args.quick else "full", torch.get_num_threads(), sizes=args.sizes,
                               kinds=args.kinds, modes=args.modes, prompt=args.prompt, new=args.new,
                               repeats=args.repeats, threshold=THRESHOLD, outlier_recipe={
                                   "dims": OUTLIER_DIMS, "gain": OUTLIER_GAIN, "choice": "randperm(hidden), seed 0",
                                   "weights": ["self_attn_layer_norm.weight", "final_layer_norm.weight"]})
    # bitsandbytes' int8 matmul logs a warning on every call; silenced for both libraries alike
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    kinds = args.kinds.split(",")
    checkpoints = [(kind, size) for size in args.sizes.split(",") for kind in kinds if kind != "bundled"]
    checkpoints += [("bundled", "bundled")] if "bundled" in kinds else []
    rows, shares = [], {}
    for kind, size in checkpoints:
        folder = write_checkpoint(args.folder, size, kind)
        share = outlier_share(folder, prompt_ids(args.prompt), args.new)
        shares[f"{kind}/{size}"] = share
        print(f"{kind} {size}: {share['rows_above']} of {share['rows']} linear input rows above {THRESHOLD} "
              f"({100 * share['rows_above'] / share['rows']:.1f}%)", flush=True)
        for mode in args.modes.split(","):
            runs = bench_mode(folder, mode, args.prompt, args.new, args.repeats)
            ours, peer = medians(runs["qopt"]), medians(runs["transformers"])
            rows.append({"kind": kind, "size": size, "mode": mode, "qopt": ours, "transformers": peer,
                         "decode_ratio": ours["decode"] / peer["decode"],
                         "prefill_ratio": ours["prefill"] / peer["prefill"], "runs": runs,
                         "outlier_rows": share["rows_above"], "rows": share["rows"]})
            print(f"{kind} {size} {mode}: decode {ours['decode']:.1f} vs {peer['decode']:.1f} tok/s, "
                  f"prefill {ours['prefill']:.0f} vs {peer['prefill']:.0f} tok/s", flush=True)
    load = os.getloadavg()[0]
    print(f"\nbatch 1, prompt {args.prompt}, {args.new} new tokens greedy, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; torch {torch.__version__}; load average {load:.2f} on {os.cpu_count()} CPUs\n")
    print("| checkpoint | size | precision | rows above 6 | qopt decode tok/s | transformers decode tok/s "
          "| decode ratio | qopt prefill tok/s | transformers prefill tok/s | prefill ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, p = r["qopt"], r["transformers"]
        print(f"| {r['kind']} | {r['size']} | {r['mode']} | {100 * r['outlier_rows'] / r['rows']:.1f}% "
              f"| {o['decode']:.1f} | {p['decode']:.1f} | {r['decode_ratio']:.2f}x | {o['prefill']:.0f} "
              f"| {p['prefill']:.0f} | {r['prefill_ratio']:.2f}x |")
    results_meta.write("bench_decode", args.quick, record, started, args.json, rows=rows, outlier_share=shares)


if __name__ == "__main__":
    main()
