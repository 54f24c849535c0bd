"""Offload benchmark: bigger than memory, and fast. qopt's layer-streamed evaluation, prefetch and throughput
generation against window-major runs and transformers + accelerate disk offload, on one random OPT checkpoint.

    .venv/bin/python evals/bench_offload.py --folder /tmp/bench-offload --size 2.7b            # all parts
    .venv/bin/python evals/bench_offload.py --folder /tmp/bench-offload --parts eval --seqlens 256
    .venv/bin/python evals/bench_offload.py --quick                                           # 125M, minutes

An OPT-shaped checkpoint of random float16 weights is written once (`bench_load.write_synthetic_checkpoint`) and
quantized once to a pre-quantized NF4 checkpoint. Every side places the same layers on disk: the second half
of the decoder layers (what a RAM budget of the embeddings, head and first half gives): qopt in NF4 (bf16
elsewhere), qopt in bf16 (`-bf16` rows: the same bytes on disk as transformers, so the schedule alone differs),
and transformers in bf16 (it refuses bitsandbytes layers on disk). One page-cache policy for every side: what
was read is dropped from the page cache after it was read (`POSIX_FADV_DONTNEED`): qopt drops each offloaded file
after reading it; for transformers, which reads disk layers straight from the checkpoint's safetensors, a hook
after each offloaded layer's forward drops that layer's byte ranges of the shards (and its offload-folder files),
and nothing else, so readahead of the next layer survives as it does for qopt. Each measurement runs in a fresh
process, one thread; bytes read are the process's `read_bytes` from /proc/self/io (what came off the block
device) over the timed call only.

Parts: (a) `eval`: perplexity over --windows windows of WikiText-2 test at each --seqlens: qopt layer-streamed
(NF4 and bf16), qopt window-major, transformers window-major; (b) `generate`: --prompts prompts x --new tokens,
greedy, no end token: qopt `generate_many` (throughput mode; NF4 and bf16), qopt's plain batched `generate` at
the same batch (left-padded), qopt `generate` one prompt at a time (measured on --single-prompts of them and
scaled), transformers' batched `generate` over all prompts; (c) `step`: batch-1 decode step time (prefill
included, over --steps tokens) with and without prefetch, taking turns, median of --repeats. Targets: bytes read
by a layer-streamed evaluation = 1x the offloaded bytes; throughput mode >= 10x one-by-one and >= 2x
transformers in tokens/s, and the like-for-like rows beside them: against qopt's own batched `generate`, and
qopt bf16 against transformers bf16. Every run goes into evals/results/bench_offload.json (--quick:
evals/results/quick/) with the machine's record; the resumable log of single measurements is beside it
(bench_offload.log.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
from results_meta import meta, results_path, write  # noqa: E402


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


def evict(paths: list[Path], sync: bool = False) -> None:
    """Drop files from the page cache; `sync` writes them back first (dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if sync:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_qopt(folder: str, offload: str):
    import qopt
    from qopt.model.config import OPTConfig

    model = qopt.load(folder, torch_dtype="bfloat16", device_map=half_on_disk(OPTConfig.from_pretrained(folder)),
                      offload_folder=offload, progress=False)
    model._qopt_offloaded.evict = True
    evict([p for p in Path(model._qopt_offloaded.save_folder).iterdir() if p.is_file()], sync=True)
    return model


def layer_ranges(folder: str, offload: str, prefix: str) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every stored byte of the tensors under `prefix`: their ranges in the
    checkpoint's safetensors shards, and whole offload-folder files named after them."""
    ranges = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with open(shard, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        for name, info in header.items():
            if name.startswith(prefix) and name != "__metadata__":
                start, end = info["data_offsets"]
                ranges.append((shard, 8 + size + start, end - start))
    ranges += [(p, 0, 0) for p in Path(offload).rglob("*") if p.is_file() and p.name.startswith(prefix)]
    return ranges


def evict_ranges(ranges: list[tuple[Path, int, int]]) -> None:
    """Drop exactly these byte ranges from the page cache (length 0: to the end of the file)."""
    for path, offset, length in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_peer(folder: str, offload: str):
    """transformers + accelerate disk offload in bf16; after each offloaded layer's forward, the bytes that layer
    read (its ranges of the shards) leave the page cache, as qopt drops each offloaded file after reading it."""
    import torch
    from transformers import OPTForCausalLM

    from qopt.model.config import OPTConfig

    placement = half_on_disk(OPTConfig.from_pretrained(folder))
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=placement,
                                           offload_folder=offload).eval()
    for name, device in placement.items():
        if device == "disk":
            ranges = layer_ranges(folder, offload, name + ".")
            model.get_submodule(name).register_forward_hook(lambda *_, r=ranges: evict_ranges(r))
    evict([p for p in Path(offload).rglob("*") if p.is_file()] + list(Path(folder).glob("*.safetensors")),
          sync=True)
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
                          streamed={"streamed": True, "streamed-bf16": True, "window": False}.get(which, False))
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
    if which in ("many", "many-bf16"):
        outputs = qopt.generate_many(model, rows, batch_size=batch_size, max_new_tokens=new, eos_token_id=[])
        generated = sum(len(o) - len(r) for o, r in zip(outputs, rows, strict=True))
    elif which == "batched":  # qopt's plain `generate`, left-padded batches of `batch_size` prompts
        outputs, generated = [], 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([[1] * (width - len(r)) + r for r in chunk])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            out = qopt.generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
            generated += (out.shape[1] - width) * len(chunk)
            outputs += [row[width:] for row in out]
    elif which == "single":
        outputs = [qopt.generate(model, torch.tensor([r]), max_new_tokens=new, eos_token_id=[])[0]
                   for r in rows[:count]]
        generated = sum(len(o) - len(r) for o, r in zip(outputs, rows[:count], strict=True))
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


def child_step(folder: str, offload: str, steps: int, repeats: int) -> dict:
    """Batch-1 decode step time with and without prefetch, taking turns in one process; medians of `repeats`."""
    import statistics

    import qopt
    from qopt.loading import layer_runner

    model = load_qopt(folder, offload)
    rows = prompt_ids(1)
    qopt.generate_many(model, rows, max_new_tokens=1, eos_token_id=[])  # CPU layout written
    streamers = []
    run = layer_runner.LayerRunner.run

    def recorded(self, *args, **kwargs):
        streamers.append(self)
        return run(self, *args, **kwargs)

    layer_runner.LayerRunner.run = recorded
    times: dict[bool, list[float]] = {True: [], False: []}
    waits: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for prefetch in (True, False):
            streamers.clear()
            began = time.perf_counter()
            qopt.generate_many(model, rows, max_new_tokens=steps, eos_token_id=[], prefetch=prefetch)
            times[prefetch].append((time.perf_counter() - began) / steps)
            stats = streamers[-1].stats
            waits[prefetch].append(stats.wait_seconds / stats.passes)
    return {f"{'prefetch' if p else 'no_prefetch'}_{key}": statistics.median(values[p])
            for p in (True, False) for key, values in (("step", times), ("wait", waits))}


def child(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    part, args = argv[0], json.loads(argv[1])
    args.pop("policy", None)  # recorded only: the loaders above apply it
    result = {"eval": child_eval, "generate": child_generate, "step": child_step}[part](**args)
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent -------------------------------------------------------------------------------------------------
def run_child(part: str, log: Path, **kwargs) -> dict:
    """One measurement in a fresh process, appended to `log`; one already there (same part and settings) is
    reused, so an interrupted run resumes where it stopped."""
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("part") == part and all(record.get(k) == v for k, v in kwargs.items()):
                print(part, kwargs.get("which", ""), "(from the log)", flush=True)
                return record
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
    from bench_load import write_synthetic_checkpoint

    import qopt

    fp16 = write_synthetic_checkpoint(folder / f"opt-{size}-fp16", size)
    nf4 = folder / f"opt-{size}-nf4"
    if not (nf4 / "config.json").exists():
        torch.set_num_threads(1)
        qopt.quantize_checkpoint(fp16, nf4, "nf4", max_shard_size="500MB")
    return fp16, nf4


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


EVAL_SIDES = ("streamed", "streamed-bf16", "window", "transformers")
GENERATE_SIDES = ("many", "batched", "single", "many-bf16", "transformers")
POLICY = "evict-what-was-read"  # in every record: runs under the earlier policy (evict all files) never match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="checkpoints and offload folders (written; default: a folder "
                        "under the temp dir)")
    parser.add_argument("--size", default="2.7b", help="OPT shape of the random checkpoint")
    parser.add_argument("--parts", nargs="+", default=["eval", "generate", "step"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eval-peers", nargs="+", default=list(EVAL_SIDES), choices=EVAL_SIDES)
    parser.add_argument("--generate-peers", nargs="+", default=list(GENERATE_SIDES), choices=GENERATE_SIDES)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per micro-batch in throughput mode "
                        "and per batch of the plain batched generate")
    parser.add_argument("--single-prompts", type=int, default=2, help="prompts timed one by one (then scaled)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed for the step part")
    parser.add_argument("--repeats", type=int, default=3, help="step part: runs of each, taking turns (median)")
    parser.add_argument("--quick", action="store_true", help="125M shape, 2 windows of 64, 4 prompts x 4 tokens; "
                        "writes evals/results/quick/")
    parser.add_argument("--json", type=Path, help="default: evals/results[/quick]/bench_offload.json")
    parser.add_argument("--log", type=Path, help="resumable log (default: beside the JSON, "
                        "bench_offload.log.jsonl)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.seqlens, args.windows, args.prompts, args.new = "125m", [64], 2, 4, 4
        args.batch_size, args.single_prompts, args.steps, args.repeats = 4, 1, 2, 1
    out = args.json or results_path("bench_offload", args.quick)
    log = args.log or out.with_name("bench_offload.log.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.quick and log.exists():
        log.unlink()  # a quick run measures again
    folder = args.folder or Path(tempfile.gettempdir()) / f"qopt-bench-offload-{args.size}"
    started = time.time()
    record = meta("quick" if args.quick else "full", 1, size=args.size, parts=args.parts, seqlens=args.seqlens,
                  windows=args.windows, prompts=args.prompts, new=args.new, batch_size=args.batch_size,
                  single_prompts=args.single_prompts, steps=args.steps, repeats=args.repeats, policy=POLICY)
    fp16, nf4 = prepare(folder, args.size)
    offload = str(folder / "offload")
    common = {"offload": offload, "policy": POLICY}
    records: list[dict] = []
    if "eval" in args.parts:
        for seqlen in args.seqlens:
            rows = {}
            for which in args.eval_peers:
                source = str(fp16 if which in ("transformers", "streamed-bf16") else nf4)
                rows[which] = run_child("eval", log, which=which, folder=source, seqlen=seqlen,
                                        windows=args.windows, **common)
                records.append({"part": "eval", "which": which, "seqlen": seqlen, "windows": args.windows,
                                **rows[which]})
            print(f"\nperplexity, {args.windows} windows of {seqlen}:")
            for which, r in rows.items():
                print(f"| {which} | {r['ppl']:.2f} | {r['seconds']:.1f} s | {gib(r['read_bytes'])} | "
                      f"{gib(r['offloaded_bytes'])} | {r['read_bytes'] / r['offloaded_bytes']:.2f}x |")
    if "generate" in args.parts:
        rows = {}
        for which in args.generate_peers:
            source = str(fp16 if which in ("transformers", "many-bf16") else nf4)
            rows[which] = run_child("generate", log, which=which, folder=source, prompts=args.prompts,
                                    new=args.new, count=args.single_prompts, batch_size=args.batch_size, **common)
            records.append({"part": "generate", "which": which, "prompts": args.prompts, "new": args.new,
                            "batch_size": args.batch_size, **rows[which]})
        print(f"\ngeneration, {args.prompts} prompts x {args.new} tokens:")
        for which, r in rows.items():
            print(f"| {which} | {r['tokens']} | {r['seconds']:.1f} s | {r['tokens'] / r['seconds']:.2f} tok/s | "
                  f"{gib(r['read_bytes'])} |")
    if "step" in args.parts:
        r = run_child("step", log, folder=str(nf4), steps=args.steps, repeats=args.repeats, **common)
        records.append({"part": "step", "steps": args.steps, "repeats": args.repeats, **r})
        print(f"\nbatch-1 decode step: prefetch {r['prefetch_step']:.3f} s (waiting for reads "
              f"{r['prefetch_wait']:.3f} s), without {r['no_prefetch_step']:.3f} s ({r['no_prefetch_wait']:.3f} s)")
    write("bench_offload", args.quick, record, started, out, size=args.size, records=records)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
