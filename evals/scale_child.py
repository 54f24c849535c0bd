"""The measuring side of evals/bench_scale.py: one part per fresh process, so every memory figure starts from a
process that holds nothing but its imports. Prints one JSON line.

    python evals/scale_child.py load    REPO SHAPE SAVE_DIR PARTS   (load, generate, perplexity, save)
    python evals/scale_child.py reload  FOLDER [PARTS]              (a saved NF4 folder + one forward [+ parts])
    python evals/scale_child.py offload REPO SHAPE OFFLOAD_DIR CPU  (device_map="auto", the rest on disk)

Anonymous memory (RssAnon) and file-backed memory (RssFile) are sampled every 5 ms by a thread; peaks are
reported above the value after imports. File pages of a memory-mapped shard are reclaimable; anonymous memory
is what must fit.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

import qopt
import qopt.loading.loader  # noqa: F401  (imports before the baseline)
from qopt.evaluation.perplexity import evaluate_ids, text_ids

WINDOW, WINDOWS, NEW_TOKENS, PROMPT = 256, 2, 8, 16
PARTIAL = os.environ.get("QOPT_BENCH_PARTIAL")  # written after every step: a run stopped late keeps the rest


def record(out: dict) -> dict:
    if PARTIAL:
        Path(PARTIAL + ".tmp").write_text(json.dumps(out, default=str))
        os.replace(PARTIAL + ".tmp", PARTIAL)
    return out


def status() -> dict[str, int]:
    """RssAnon, RssFile, VmHWM, VmRSS of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile since the last `phase()`, read every `period` seconds."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.base = status()
        self.peak_anon = self.peak_file = self.samples = 0
        self.phase()

    def phase(self) -> dict[str, int]:
        """Peaks of the phase that ends now (above the post-import baseline); starts the next."""
        done = {"peak_anon": self.peak_anon - self.base["RssAnon"], "peak_file": self.peak_file, "samples":
                self.samples}
        now = status()
        self.peak_anon, self.peak_file, self.samples = now["RssAnon"], now["RssFile"], 0
        return done

    def run(self) -> None:
        while not self.stop.is_set():
            now = status()
            self.peak_anon = max(self.peak_anon, now["RssAnon"])
            self.peak_file = max(self.peak_file, now["RssFile"])
            self.samples += 1
            time.sleep(self.period)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct CPU storages behind parameters and buffers: the model in its after-load layout."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    for module in model.modules():  # bitsandbytes keeps absmax / code in the weight's quant_state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for value in (state.as_dict(packed=False).values() if state is not None else ()):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel():
                seen.setdefault(value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
    return sum(seen.values())


def prompt_ids() -> torch.Tensor:
    return torch.cat([torch.tensor([2]), text_ids()[:PROMPT - 1]])[None]


def decode(model: torch.nn.Module, sampler: Sampler) -> dict:
    """First forward (with the 4-bit repack), a second one, then greedy tokens timed step by step."""
    ids = prompt_ids()
    out: dict = {}
    with torch.no_grad():
        for key in ("first_forward_s", "second_forward_s"):
            began = time.perf_counter()
            model(ids)
            out[key] = time.perf_counter() - began
    out["repack_s"] = out["first_forward_s"] - out["second_forward_s"]
    stamps = [time.perf_counter()]
    qopt.generate(model, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[],
                  streamer=lambda tokens: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    out.update(step_s=steps, tokens=NEW_TOKENS, prefill_s=steps[0] if steps else None,
               s_per_token=sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else None,
               **{f"decode_{k}": v for k, v in sampler.phase().items()})
    return out


def perplexity(model: torch.nn.Module, sampler: Sampler) -> dict:
    ids = text_ids()[:WINDOW * WINDOWS]
    before = status()["RssAnon"]
    sampler.phase()
    began = time.perf_counter()
    result = evaluate_ids(model, ids, seqlen=WINDOW, max_windows=WINDOWS, progress=False)
    phase = sampler.phase()
    out = {"perplexity": result.ppl, "seconds": time.perf_counter() - began, "windows": WINDOWS,
           "window": WINDOW, "extra_anon": phase["peak_anon"] + sampler.base["RssAnon"] - before}
    streaming = getattr(result, "streaming", None)
    if streaming:
        out["streaming"] = streaming
    return out


def plan_dict(plan: qopt.MemoryPlan) -> dict:
    return {"verdict": plan.verdict, "weight_bytes": plan.weight_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
            "activation_bytes": plan.activation_bytes, "parameters": plan.parameters,
            "used_bytes": {d: plan.used_bytes(d) for d in plan.limits}, "flags": plan.flags(),
            **{k: getattr(plan, k) for k in ("peak_anon_bytes", "peak_host_bytes") if hasattr(plan, k)}}


def download_prediction(repo: str, memory: qopt.MemoryPlan) -> dict:
    source = qopt.resolve_model(repo, keep_download=False, progress=False)
    plan = qopt.download_plan(source, memory, keep_download=False)
    return {"peak_disk_bytes": plan.peak_disk_bytes, "peak_host_bytes": plan.peak_host_bytes,
            "download_bytes": plan.download_bytes, "shard_bytes": plan.shard_bytes,
            **{k: getattr(plan, k) for k in ("peak_anonymous_bytes", "mapped_bytes", "quantize_buffer_bytes")
               if hasattr(plan, k)}}


def part_load(repo: str, shape: str, save_dir: str, parts: list[str]) -> dict:
    sampler = Sampler()
    sampler.start()
    memory = qopt.plan(shape, 4, {"cpu": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
                       context=WINDOW, batch=1)
    out: dict = {"plan": plan_dict(memory), "download_plan": download_prediction(repo, memory),
                 "base": sampler.base}
    sampler.phase()
    began = time.perf_counter()
    model = qopt.load(repo, quantization="nf4", keep_download=False, progress=False)
    seconds = time.perf_counter() - began
    phase, now = sampler.phase(), status()
    out["load"] = {"seconds": seconds, "mparams_per_s": memory.parameters / seconds / 1e6, **phase,
                   "anon_after": now["RssAnon"] - sampler.base["RssAnon"], "VmHWM": now["VmHWM"],
                   "model_bytes": model_bytes(model), "placement": sorted({str(d) for d in
                                                                           model.hf_device_map.values()})}
    out["VmHWM"] = status()["VmHWM"]
    record(out)
    steps(model, sampler, parts, out, save_dir)
    return out


def steps(model: torch.nn.Module, sampler: Sampler, parts: list[str], out: dict, save_dir: str = "") -> None:
    """Save first (before any forward), then decode and perplexity; the JSON is rewritten after each."""
    if "save" in parts:
        out["save"] = record(attempt(save, model, save_dir))
    if "generate" in parts:
        out["generate"] = attempt(decode, model, sampler)
        record(out)
    if "perplexity" in parts:
        out["perplexity"] = attempt(perplexity, model, sampler)
    out["VmHWM"] = status()["VmHWM"]
    record(out)


def attempt(step, *args: object) -> dict:
    """One step's result, or its error: a failure late in a 25-minute run keeps what came before."""
    try:
        return step(*args)
    except Exception as err:  # noqa: BLE001 (reported in the JSON, the run goes on)
        import traceback

        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


def save(model: torch.nn.Module, folder: str) -> dict:
    began = time.perf_counter()
    model.save_pretrained(folder)
    return {"seconds": time.perf_counter() - began, "bytes": sum(p.stat().st_size for p in Path(folder).iterdir())}


def part_reload(folder: str, parts: list[str]) -> dict:
    """A saved NF4 folder loaded in a fresh process, then one forward (with the CPU repack; timed apart); the
    decode and perplexity parts, when asked, run on this model (one repack for all of them)."""
    sampler = Sampler()
    sampler.start()
    began = time.perf_counter()
    model = qopt.load(folder, progress=False)
    out: dict = {"load_s": time.perf_counter() - began, **sampler.phase(), "VmHWM": status()["VmHWM"]}
    record(out)
    with torch.no_grad():
        model(prompt_ids())
    out.update(forward_s=time.perf_counter() - began - out["load_s"], seconds=time.perf_counter() - began,
               forward_peak_anon=sampler.phase()["peak_anon"])
    record(out)
    steps(model, sampler, [p for p in parts if p != "save"], out)
    return out


def part_offload(repo: str, shape: str, offload_dir: str, cpu: str) -> dict:
    sampler = Sampler()
    sampler.start()
    # the run's budget: perplexity scores micro-batches of WINDOWS windows of WINDOW tokens (all logits); the
    # KV cache of generate_many's 8 rows of PROMPT + NEW_TOKENS tokens is smaller than theirs would be
    budget = dict(context=WINDOW, batch=WINDOWS, all_logits=True)
    memory = qopt.plan(shape, 4, {"cpu": cpu}, **budget)
    kwargs: dict = dict(quantization="nf4", keep_download=False, device_map="auto", max_memory={"cpu": cpu},
                        offload_folder=offload_dir, progress=False, **budget)
    out: dict = {"plan": plan_dict(memory), "download_plan": download_prediction(repo, memory),
                 "load_budget": budget, "base": sampler.base}
    sampler.phase()
    began = time.perf_counter()
    model = qopt.load(repo, **kwargs)
    seconds, phase = time.perf_counter() - began, sampler.phase()
    placed: dict[str, int] = {}
    for device in model.hf_device_map.values():
        placed[str(device)] = placed.get(str(device), 0) + 1
    offload_bytes = sum(p.stat().st_size for p in Path(offload_dir).rglob("*") if p.is_file())
    from qopt.place.device_map import summarize

    out["load"] = {"seconds": seconds, "mparams_per_s": memory.parameters / seconds / 1e6, **phase,
                   "anon_after": status()["RssAnon"] - sampler.base["RssAnon"], "model_bytes": model_bytes(model),
                   "offload_bytes": offload_bytes, "placement": summarize(model.hf_device_map),
                   "same_map_as_plan": {k: str(v) for k, v in model.hf_device_map.items()} ==
                   {k: str(v) for k, v in memory.device_map.items()}}
    record(out)
    out["perplexity"] = attempt(perplexity, model, sampler)
    record(out)
    out["generate_many"] = attempt(throughput, model, sampler)
    out["VmHWM"] = status()["VmHWM"]
    return record(out)


def throughput(model: torch.nn.Module, sampler: Sampler) -> dict:
    batch = 8
    store = getattr(model, "_qopt_offloaded", None)
    read_before = getattr(store, "bytes_read", 0)
    prompts = [text_ids()[k * PROMPT:(k + 1) * PROMPT].tolist() for k in range(batch)]
    began = time.perf_counter()
    qopt.generate_many(model, prompts, batch_size=batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                       eos_token_id=[])
    seconds = time.perf_counter() - began
    read = getattr(store, "bytes_read", 0) - read_before
    return {"prompts": batch, "tokens": NEW_TOKENS, "seconds": seconds, "bytes_read": read,
            "bytes_read_per_step": read / NEW_TOKENS, **sampler.phase()}


def main() -> None:
    torch.manual_seed(0)
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "load":
        result = part_load(args[0], args[1], args[2], args[3].split(","))
    elif kind == "reload":
        result = part_reload(args[0], args[1].split(",") if len(args) > 1 else [])
    elif kind == "offload":
        result = part_offload(*args)
    else:
        raise SystemExit(f"unknown part {kind!r}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
