"""Offload benchmark: bigger than memory, and fast. qopt's layer-streamed evaluation, prefetch and throughput
generation against window-major runs and transformers + accelerate disk offload, on one random OPT checkpoint.

    .venv/bin/python evals/bench_offload.py --folder /tmp/bench-offload --size 1.3b            # all parts
    .venv/bin/python evals/bench_offload.py --folder /tmp/bench-offload --parts eval --seqlens 256

An OPT-shaped checkpoint of random float16 weights is written once (`bench_load.write_synthetic_checkpoint`) and
quantized once to a pre-quantized NF4 checkpoint. Both libraries place the same layers on disk: the second half
of the decoder layers (what a RAM budget of the embeddings, head and first half gives), qopt in NF4 (bf16
elsewhere), transformers in bf16 (it refuses bitsandbytes layers on disk). Every offloaded file is dropped from
the page cache after it is read (`POSIX_FADV_DONTNEED`; qopt after each read, transformers after each offloaded
layer's forward), so every pass reads the disk. Each measurement runs in a fresh process, one thread;
bytes read are the process's `read_bytes` from /proc/self/io (what came off the block device) over the timed
call only.

Parts: (a) `eval`: perplexity over --windows windows of WikiText-2 test at each --seqlens: qopt layer-streamed,
qopt window-major, transformers window-major; (b) `generate`: --prompts prompts x --new tokens, greedy, no end
token: qopt `generate_many` (throughput mode), qopt `generate` one prompt at a time (measured on
--single-prompts of them and scaled), transformers' batched `generate` over all prompts; (c) `step`: batch-1
decode step time with and without prefetch. Targets: bytes read by a layer-streamed evaluation = 1x the
offloaded bytes; throughput mode >= 10x one-by-one and >= 2x transformers in tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- in the child process ---------------------------------------------------------------------------------------
def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def half_on_disk(config) -> dict:
    """Embeddings, head, final norm and the first half of the decoder layers on the CPU; the rest on disk."""
    n = config.num_hidden_layers
    placement = {f"model.decoder.{m}": "cpu" for m in ("embed_tokens", "embed_positions", "final_layer_norm")}
    placement["lm_head"] = "cpu"
    placement.update({f"model.decoder.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)})
    return placement


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_qopt(folder: str, offload: str):
    import qopt
    from qopt.model.config import OPTConfig

    model = qopt.load(folder, torch_dtype="bfloat16", device_map=half_on_disk(OPTConfig.from_pretrained(folder)),
                      offload_folder=offload, progress=False)
    model._qopt_offloaded.evict = True
    evict([p for p in Path(model._qopt_offloaded.save_folder).iterdir() if p.is_file()])  # just written: cached
    return model


def load_peer(folder: str, offload: str):
    """transformers + accelerate disk offload in bf16, each offloaded layer's files evicted after its forward."""
    import torch
    from transformers import OPTForCausalLM

    from qopt.model.config import OPTConfig

    placement = half_on_disk(OPTConfig.from_pretrained(folder))
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=placement,
                                           offload_folder=offload).eval()
    files = [p for p in Path(offload).rglob("*") if p.is_file()] + list(Path(folder).glob("*.safetensors"))
    for name, device in placement.items():
        if device == "disk":
            model.get_submodule(name).register_forward_hook(lambda *_: evict(files))
    evict(files)
    return model


def peer_offloaded_bytes(model) -> int:
    """transformers 5 reads disk-offloaded weights straight from the checkpoint's safetensors (float16 here)."""
    from qopt.model.config import OPTConfig

    disk = tuple(n + "." for n, d in half_on_disk(OPTConfig.from_pretrained(model.name_or_path)).items()
                 if d == "disk")
    return sum(p.numel() * 2 for n, p in model.named_parameters() if n.startswith(disk))


def wikitext_ids():
    from qopt.evaluation.perplexity import text_ids

    return text_ids()


def child_eval(which: str, folder: str, offload: str, seqlen: int, windows: int) -> dict:
    from qopt.evaluation.perplexity import evaluate_ids

    model = load_peer(folder, offload) if which == "transformers" else load_qopt(folder, offload)
    store = getattr(model, "_qopt_offloaded", None)
    offloaded = sum(store.nbytes(k) for k in store) if store is not None else peer_offloaded_bytes(model)
    ids = wikitext_ids()
    before, began = read_bytes(), time.perf_counter()
    result = evaluate_ids(model, ids, seqlen, max_windows=windows, progress=False,
                          streamed={"streamed": True, "window": False}.get(which, False))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "read_bytes": read_bytes() - before, "offloaded_bytes": offloaded,
            "counted": getattr(store, "bytes_read", None), "ppl": result.ppl, "tokens": result.tokens}


def prompt_ids(count: int) -> list[list[int]]:
    """`count` prompts of 8 to 24 tokens cut from WikiText-2, each starting with </s>."""
    ids = wikitext_ids().tolist()
    return [[2] + ids[1000 + 97 * i: 1000 + 97 * i + 8 + (i * 7) % 17] for i in range(count)]


def child_generate(which: str, folder: str, offload: str, prompts: int, new: int, count: int,
                   batch_size: int) -> dict:
    import torch

    import qopt

    rows = prompt_ids(prompts)
    model = load_peer(folder, offload) if which == "transformers" else load_qopt(folder, offload)
    if which != "transformers":  # first forward of each 4-bit layer writes its CPU layout: not part of the timing
        qopt.generate_many(model, rows[:1], max_new_tokens=1, eos_token_id=[])
    before, began = read_bytes(), time.perf_counter()
    if which == "many":
        outputs = qopt.generate_many(model, rows, batch_size=batch_size, max_new_tokens=new, eos_token_id=[])
        generated = sum(len(o) - len(r) for o, r in zip(outputs, rows))
    elif which == "single":
        outputs = [qopt.generate(model, torch.tensor([r]), max_new_tokens=new, eos_token_id=[])[0]
                   for r in rows[:count]]
        generated = sum(len(o) - len(r) for o, r in zip(outputs, rows))
    else:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[1] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
        generated = (out.shape[1] - width) * len(rows)
        outputs = [row[width:] for row in out]
    seconds = time.perf_counter() - began
    first = [int(t) for t in outputs[0][-new:]]
    return {"seconds": seconds, "read_bytes": read_bytes() - before, "tokens": generated, "first": first}


def child_step(folder: str, offload: str, prefetch: bool, steps: int) -> dict:
    import qopt

    model = load_qopt(folder, offload)
    rows = prompt_ids(1)
    qopt.generate_many(model, rows, max_new_tokens=1, eos_token_id=[], prefetch=prefetch)  # CPU layout written
    timings = []
    for new in (1, steps + 1):
        began = time.perf_counter()
        qopt.generate_many(model, rows, max_new_tokens=new, eos_token_id=[], prefetch=prefetch)
        timings.append(time.perf_counter() - began)
    return {"step_seconds": (timings[1] - timings[0]) / steps, "prefetch": prefetch}


def child(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    part, args = argv[0], json.loads(argv[1])
    result = {"eval": child_eval, "generate": child_generate, "step": child_step}[part](**args)
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent -------------------------------------------------------------------------------------------------
def run_child(part: str, log: Path, **kwargs) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, __file__, "--child", part, json.dumps(kwargs)], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"{part} {kwargs} failed:\n{out.stderr[-3000:]}")
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    with open(log, "a") as file:
        file.write(json.dumps({"part": part, **kwargs, **result}) + "\n")
    print(part, kwargs.get("which", ""), result, flush=True)
    return result


def prepare(folder: Path, size: str) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "evals"))
    import torch

    import qopt
    from bench_load import write_synthetic_checkpoint

    fp16 = write_synthetic_checkpoint(folder / f"opt-{size}-fp16", size)
    nf4 = folder / f"opt-{size}-nf4"
    if not (nf4 / "config.json").exists():
        torch.set_num_threads(1)
        qopt.quantize_checkpoint(fp16, nf4, "nf4", max_shard_size="500MB")
    return fp16, nf4


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="checkpoints and offload folders (written)")
    parser.add_argument("--size", default="1.3b", help="OPT shape of the random checkpoint")
    parser.add_argument("--parts", nargs="+", default=["eval", "generate", "step"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eval-peers", nargs="+", default=["streamed", "window", "transformers"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per micro-batch in throughput mode")
    parser.add_argument("--single-prompts", type=int, default=2, help="prompts timed one by one (then scaled)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed for the step part")
    parser.add_argument("--log", type=Path, default=ROOT / "evals" / "results" / "bench_offload.jsonl")
    args = parser.parse_args()
    fp16, nf4 = prepare(args.folder, args.size)
    offload = str(args.folder / "offload")
    common = {"offload": offload}
    if "eval" in args.parts:
        for seqlen in args.seqlens:
            rows = {}
            for which in args.eval_peers:
                folder = str(fp16 if which == "transformers" else nf4)
                rows[which] = run_child("eval", args.log, which=which, folder=folder, seqlen=seqlen,
                                        windows=args.windows, **common)
            print(f"\nperplexity, {args.windows} windows of {seqlen}:")
            for which, r in rows.items():
                print(f"| {which} | {r['ppl']:.2f} | {r['seconds']:.1f} s | {gib(r['read_bytes'])} | "
                      f"{gib(r['offloaded_bytes'])} | {r['read_bytes'] / r['offloaded_bytes']:.2f}x |")
    if "generate" in args.parts:
        rows = {}
        for which in ("many", "single", "transformers"):
            folder = str(fp16 if which == "transformers" else nf4)
            rows[which] = run_child("generate", args.log, which=which, folder=folder, prompts=args.prompts,
                                    new=args.new, count=args.single_prompts, batch_size=args.batch_size, **common)
        print(f"\ngeneration, {args.prompts} prompts x {args.new} tokens:")
        for which, r in rows.items():
            print(f"| {which} | {r['tokens']} | {r['seconds']:.1f} s | {r['tokens'] / r['seconds']:.2f} tok/s | "
                  f"{gib(r['read_bytes'])} |")
    if "step" in args.parts:
        for prefetch in (True, False):
            run_child("step", args.log, folder=str(nf4), prefetch=prefetch, steps=args.steps, **common)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        started = time.time()
        main()
        print(f"({time.time() - started:.0f} s)")
