"""Load benchmark: qopt's streaming NF4 load against transformers' on the same synthetic OPT checkpoint.

    .venv/bin/python evals/bench_load.py --folder /work/tmp/opt-1.3b-synth            # 1.3B: ours vs transformers
    .venv/bin/python evals/bench_load.py --shape 13b --folder /work/tmp/opt-13b-synth  # 13B (26 GB): ours only
    .venv/bin/python evals/bench_load.py --quick                                       # 125M shape, one round

The checkpoint is written once (random float16 weights, shards of at most 500 MB, the real OPT config) and
reused. Each load runs in a fresh subprocess, and the sides are interleaved: round r runs qopt then transformers
(transformers first in odd rounds), so both see the same machine. Two peaks, each above its value right after
the imports: VmHWM (the kernel's high-water mark of the whole RSS, which also counts the memory-mapped shards'
file-backed pages, reclaimable at will) and peak RssAnon (anonymous memory only: what the process really holds;
the kernel keeps no high-water mark for it, so a thread samples it every 5 ms). Load time is the wall time of
the load call. Every run is in the JSON (evals/results/bench_load.json; --quick: evals/results/quick/); the
summary gives medians with their spread (max - min); ratios are ours / transformers' medians. Targets: peak
RSS <= 1.1 x (quantized model + largest shard) and <= 0.5 x transformers'; load time <= 0.5 x transformers'.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
import results_meta  # noqa: E402

SHARD_BYTES = 500 * 10**6

_CHILD = r"""
import json, sys, time, torch
from results_meta import PeakAnon, status_bytes
which, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
if which == "qopt":
    import qopt
    from qopt.quant.modules import quantized_state
    load = lambda: qopt.load(folder, quantization="nf4", torch_dtype=torch.bfloat16, progress=False)
else:
    import bitsandbytes
    from transformers import BitsAndBytesConfig, OPTForCausalLM
    import transformers.integrations.bitsandbytes, transformers.quantizers.quantizer_bnb_4bit
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    load = lambda: OPTForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16)
base, base_anon = status_bytes("VmRSS"), status_bytes("RssAnon")
with PeakAnon() as anon:
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
held = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
print(json.dumps({"seconds": seconds, "peak": status_bytes("VmHWM") - base, "peak_anon": anon.peak - base_anon,
                  "model_bytes": held}))
"""


def write_synthetic_checkpoint(folder: Path, size: str = "1.3b", seed: int = 0) -> Path:
    """An OPT-shaped checkpoint of random float16 weights in <= 500 MB shards, written shard by shard."""
    from qopt.place.plan import config_for

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    config, _ = config_for(f"opt-{size}")
    config.torch_dtype = "float16"
    h, f, n = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    shapes = {"model.decoder.embed_tokens.weight": (config.vocab_size, h),
              "model.decoder.embed_positions.weight": (config.max_position_embeddings + 2, h),
              "model.decoder.final_layer_norm.weight": (h,), "model.decoder.final_layer_norm.bias": (h,)}
    for i in range(n):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({p + f"self_attn.{proj}.weight": (h, h), p + f"self_attn.{proj}.bias": (h,)})
        shapes.update({p + "fc1.weight": (f, h), p + "fc1.bias": (f,), p + "fc2.weight": (h, f), p + "fc2.bias": (h,)})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes.update({p + f"{norm}.weight": (h,), p + f"{norm}.bias": (h,)})
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and used + nbytes > SHARD_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            std = 0.02 if len(shapes[name]) == 2 else 0.1
            tensors[name] = (torch.randn(shapes[name], generator=gen) * std).half()
            if name.endswith("layer_norm.weight"):
                tensors[name] += 1
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        print(f"wrote {file} ({sum(t.numel() * 2 for t in tensors.values()) / 1e6:.0f} MB)", flush=True)
    config.save_pretrained(folder)
    index = {"metadata": {"total_size": sum(2 * torch.Size(s).numel() for s in shapes.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def measure(which: str, folder: Path, threads: int = 0) -> dict:
    """One load in a fresh subprocess: {"seconds", "peak" (VmHWM over the post-import RSS), "peak_anon" (peak
    RssAnon over the post-import RssAnon), "model_bytes"}."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "evals"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD, which, str(folder), str(threads)], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"{which} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), max(values) - min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="where the synthetic checkpoint is (written; default: a "
                        "folder under the temp dir)")
    parser.add_argument("--shape", default="1.3b", help="OPT size of the synthetic checkpoint (1.3b, 13b, ...)")
    parser.add_argument("--runs", type=int, default=3, help="rounds; each round loads every side once")
    parser.add_argument("--ours-only", action="store_true", help="skip transformers (implied at 13b and up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per load (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="125M shape, one round; writes "
                        "evals/results/quick/bench_load.json")
    parser.add_argument("--json", type=Path, help="default: evals/results[/quick]/bench_load.json")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.runs = "125m", 1
    folder = write_synthetic_checkpoint(args.folder or Path(tempfile.gettempdir()) / f"qopt-bench-load-{args.shape}",
                                        args.shape)
    started = time.time()
    record = results_meta.meta("quick" if args.quick else "full", args.threads or torch.get_num_threads(),
                               shape=args.shape, runs=args.runs, sampling_ms=5)
    shard = max(p.stat().st_size for p in folder.glob("*.safetensors"))
    big = args.shape in ("13b", "30b", "66b", "175b")
    peers = ["qopt"] if args.ours_only or big else ["qopt", "transformers"]
    results: dict[str, list[dict]] = {which: [] for which in peers}
    for round_ in range(args.runs):
        for which in peers if round_ % 2 == 0 else peers[::-1]:
            results[which].append({"round": round_, **measure(which, folder, args.threads)})
            print(f"{which}: {results[which][-1]}", flush=True)
    ours = results["qopt"]
    model_bytes = ours[0]["model_bytes"]
    target = 1.1 * (model_bytes + shard)
    print(f"\nOPT-{args.shape} synthetic, NF4 (bf16 elsewhere), {args.runs} interleaved rounds, median (spread)")
    print(f"quantized model {model_bytes / 2**30:.2f} GiB, largest shard {shard / 2**30:.2f} GiB, "
          f"RSS target 1.1 x (model + shard) = {target / 2**30:.2f} GiB")
    summaries = {}
    for which, runs in results.items():
        summaries[which] = {key: dict(zip(("median", "spread"), summary(runs, key), strict=True))
                            for key in ("seconds", "peak", "peak_anon")}
        (t, dt), (m, dm), (a, da) = (summary(runs, k) for k in ("seconds", "peak", "peak_anon"))
        print(f"{which:13s} load {t:7.1f} s ({dt:.1f})   peak RSS {m / 2**30:6.2f} GiB ({dm / 2**30:.2f})   "
              f"peak anonymous {a / 2**30:6.2f} GiB ({da / 2**30:.2f})")
    ratios = {}
    if "transformers" in results:
        for key, label in (("seconds", "load time"), ("peak", "peak RSS (VmHWM)"), ("peak_anon", "peak RssAnon")):
            ratios[key] = summary(ours, key)[0] / summary(results["transformers"], key)[0]
            print(f"ratio ours / transformers, {label}: {ratios[key]:.2f} (target <= 0.5)")
    print(f"ours peak RSS / (model + shard): {summary(ours, 'peak')[0] / (model_bytes + shard):.2f} (target <= 1.1)")
    results_meta.write("bench_load", args.quick, record, started, args.json, shape=args.shape,
                       model_bytes=model_bytes, largest_shard=shard, runs=results, summary=summaries, ratios=ratios)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
