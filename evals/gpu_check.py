"""GPU readiness in one command: tests/test_gpu.py, then a short benchmark on one GPU; one JSON, one table.

    make gpu-check                                   # installs what is missing, then runs (under 8 minutes)
    NO_INSTALL=1 python evals/gpu_check.py           # uses what is installed
    BNB_PATH=/path/to/deps NO_INSTALL=1 python evals/gpu_check.py   # bitsandbytes from a copied folder
    python evals/gpu_check.py --make-bnb-copy DIR    # build that folder from this machine's bitsandbytes

Benchmark, random weights (qopt's init), both libraries on the same checkpoint and GPU:
- decode tokens/s at batch 1 and batch 16, OPT-1.3B shape, NF4 and LLM.int8 (bf16 compute), qopt against
  transformers + bitsandbytes: greedy, --prompt tokens, then (--new - 1) tokens timed as the difference
  between a --new-token and a 1-token generate, never stopping early; tokens/s counts every sequence of the
  batch; median of --repeats.
- NF4 load of an OPT-6.7B-shaped float16 checkpoint (2 GB shards) onto the GPU: seconds, peak and resident
  GPU memory (torch.cuda.max_memory_allocated / memory_allocated) against `qopt.plan`'s GPU figure.
Each measurement runs in its own process, so allocator peaks and caches do not leak between them. Without a
GPU every GPU part is skipped with the reason, and the JSON is still written.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"torch": "torch", "bitsandbytes": "bitsandbytes>=0.48", "transformers": "transformers==5.24.*",
          "accelerate": "accelerate>=1.0", "peft": "peft==0.21.2", "pytest": "pytest>=8"}
# what --make-bnb-copy carries: bitsandbytes' Python files, one CUDA library and the CPU one, and pytest with
# its pure-Python dependencies for machines that lack it
CARRIED = ("_pytest", "pytest", "pluggy", "iniconfig", "py.py")


def _env() -> dict[str, str]:
    """The environment for child processes: the repository and BNB_PATH first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(ROOT)] + ([os.environ["BNB_PATH"]] if os.environ.get("BNB_PATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _ensure_packages() -> list[str]:
    """Install what is missing unless NO_INSTALL=1; returns the names still missing."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing and os.environ.get("NO_INSTALL") != "1":
        print(f"installing {', '.join(NEEDED[m] for m in missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *(NEEDED[m] for m in missing)], check=False)
        importlib.invalidate_caches()
        missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    return missing


def make_bnb_copy(target: Path, cuda: str) -> None:
    """A trimmed copy of the installed bitsandbytes (and pytest) for an offline GPU machine: Python files,
    libbitsandbytes_cuda<cuda>.so and the CPU library only (the wheel ships a library per CUDA / ROCm / XPU
    version, 200+ MB in all)."""
    import bitsandbytes

    source = Path(bitsandbytes.__file__).parent
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    if not (source / f"libbitsandbytes_cuda{cuda}.so").is_file():
        raise SystemExit(f"{source}: no libbitsandbytes_cuda{cuda}.so in this bitsandbytes")
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "bitsandbytes", ignore_errors=True)
    shutil.copytree(source, target / "bitsandbytes", ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (n.startswith("libbitsandbytes_") and n not in keep)])
    site = source.parent
    for name in CARRIED:
        if (site / name).is_dir():
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(site / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (site / name).is_file():
            shutil.copy2(site / name, target / name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"wrote {target} ({size / 2**20:.1f} MiB): BNB_PATH={target} BNB_CUDA_VERSION={cuda}")


# -- the parts ----------------------------------------------------------------------------------------------
def run_tests(work: Path, timeout: int) -> dict[str, Any]:
    xml = work / "test_gpu.xml"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                               "tests/test_gpu.py", f"--junitxml={xml}"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout}
    result: dict[str, Any] = {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                              "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}
    if xml.is_file():
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
        result["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
        result["failed"] = [c.get("name") for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    return result


def write_random_checkpoint(folder: Path, size: str, shard_bytes: int = 2 * 10**9) -> Path:
    """A float16 OPT-`size` checkpoint of normal(0, 0.02) weights, generated tensor by tensor (on the GPU where
    there is one) and written in shards, so a 6.7B one never exists in memory whole."""
    import torch
    from safetensors.torch import save_file

    from qopt.place.plan import config_for
    from qopt.place.sizes import meta_model

    if (folder / "config.json").is_file():
        return folder
    config, _ = config_for(f"opt-{size}")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names = [(n, p.shape) for n, p in meta_model(config, None).named_parameters()]  # tied lm_head listed once

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in names:
        value = torch.empty(shape, dtype=torch.float16, device=device)
        if name.endswith("layer_norm.weight"):
            value.fill_(1.0)
        elif name.endswith(".bias"):
            value.zero_()
        else:
            value.normal_(0, 0.02, generator=generator)
        shard[name] = value.cpu()
        if sum(t.numel() * 2 for t in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.torch_dtype = "float16"
    config.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _worker(kind: str, payload: dict[str, Any], timeout: int) -> dict[str, Any]:
    """One measurement in a fresh process (its result is the last line of stdout, as JSON)."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(payload)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1])


def _load(folder: str, library: str, quantization: str) -> Any:
    import torch

    if library == "qopt":
        import qopt

        return qopt.load(folder, quantization=quantization, torch_dtype=torch.bfloat16, device_map={"": 0},
                         progress=False)
    from transformers import BitsAndBytesConfig, OPTForCausalLM

    config = BitsAndBytesConfig(load_in_8bit=True) if quantization == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": 0},
                                           quantization_config=config)
    model.generation_config.eos_token_id = None  # never stop early
    return model.eval()


def worker_decode(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = _load(p["folder"], p["library"], p["quantization"])
    extra = {"eos_token_id": []} if p["library"] == "qopt" else {}
    result = {}
    for batch in p["batches"]:
        ids = torch.randint(3, 50000, (batch, p["prompt"]), generator=torch.Generator().manual_seed(0)).cuda()

        def generate(n: int, ids: torch.Tensor = ids) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **extra)
            torch.cuda.synchronize()
            assert out.shape[1] == ids.shape[1] + n, f"generated {out.shape[1] - ids.shape[1]} tokens, not {n}"
            return time.perf_counter() - start

        generate(4)  # warm-up: kernels, allocator
        rates = [batch * (p["new"] - 1) / (generate(p["new"]) - generate(1)) for _ in range(p["repeats"])]
        result[str(batch)] = round(statistics.median(rates), 1)
    return result


def worker_load(p: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    import qopt

    free, _ = torch.cuda.mem_get_info()
    planned = qopt.plan(p["folder"], 4, {0: free, "cpu": "1TiB"}, context=2048)
    torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = _load(p["folder"], p["library"], "nf4")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gib = 2**30
    return {"seconds": round(seconds, 1),
            "peak_gpu_gib": round((torch.cuda.max_memory_allocated() - start_alloc) / gib, 3),
            "resident_gpu_gib": round((torch.cuda.memory_allocated() - start_alloc) / gib, 3),
            "plan_gpu_weights_gib": round(planned.weight_bytes.get("0", 0) / gib, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "device_map": sorted({str(v) for v in getattr(model, "hf_device_map", {"": 0}).values()})}


# -- report -------------------------------------------------------------------------------------------------
def _cell(result: dict[str, Any], key: str) -> str:
    value = result.get(key, result.get("error", result.get("skipped", "-")))
    return str(value).strip().splitlines()[-1][:60] if value != "" else "-"


def table(report: dict[str, Any]) -> str:
    lines = [f"GPU check ({report['gpu'] or 'no GPU'}; torch {report['versions'].get('torch')}, bitsandbytes "
             f"{report['versions'].get('bitsandbytes')}, transformers {report['versions'].get('transformers')})", ""]
    tests = report["tests"]
    if "tests" in tests:
        lines.append(f"tests/test_gpu.py: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped in {tests['seconds']} s"
                     + (f" (skipped: {'; '.join(tests['skip_reasons'])})" if tests["skip_reasons"] else ""))
        lines += [f"  FAILED {name}" for name in tests.get("failed", [])]
    else:
        lines.append(f"tests/test_gpu.py: {tests}")
    decode = report["decode"]
    lines.append("")
    if "skipped" in decode:
        lines.append(f"decode (OPT-1.3B shape): skipped: {decode['skipped']}")
    else:
        lines += ["| decode, OPT-1.3B shape | batch | qopt tok/s | transformers tok/s | ratio |",
                  "|---|---:|---:|---:|---:|"]
        for quant, runs in decode["results"].items():
            ours, peer = runs.get("qopt", {}), runs.get("transformers", {})
            for batch in map(str, decode["batches"]):
                a, b = ours.get(batch), peer.get(batch)
                ratio = f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b else "-"
                lines.append(f"| {quant} | {batch} | {_cell(ours, batch)} | {_cell(peer, batch)} | {ratio} |")
    load = report["load_6.7b"]
    lines.append("")
    if "skipped" in load:
        lines.append(f"NF4 load (OPT-6.7B shape): skipped: {load['skipped']}")
    else:
        lines += ["| NF4 load, OPT-6.7B shape | seconds | peak GPU GiB | resident GiB | plan GiB |",
                  "|---|---:|---:|---:|---:|"]
        for library, r in load["results"].items():
            lines.append(f"| {library} | {_cell(r, 'seconds')} | {r.get('peak_gpu_gib', '-')} | "
                         f"{r.get('resident_gpu_gib', '-')} | {r.get('plan_gpu_weights_gib', '-')} |")
    lines.append(f"\n{report['seconds']} s in all; JSON: {report['json']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "evals" / "results" / "gpu_check.json")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qopt-gpu-check",
                        help="random checkpoints (about 16 GB; reused, removed with --clean)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-load", action="store_true", help="also time transformers' 6.7B NF4 load")
    parser.add_argument("--budget", type=int, default=450, help="seconds: parts not started by then are skipped")
    parser.add_argument("--clean", action="store_true", help="remove --work-dir at the end")
    parser.add_argument("--make-bnb-copy", type=Path, metavar="DIR")
    parser.add_argument("--cuda", default="130", help="CUDA version of the library --make-bnb-copy keeps")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("BNB_PATH"):
        sys.path.insert(0, os.environ["BNB_PATH"])
    sys.path.insert(0, str(ROOT))
    if args.worker:
        kind, payload = args.worker
        print(json.dumps({"decode": worker_decode, "load": worker_load}[kind](json.loads(payload))))
        return 0
    if args.make_bnb_copy:
        make_bnb_copy(args.make_bnb_copy, args.cuda)
        return 0
    started = time.perf_counter()
    missing = _ensure_packages()
    import torch

    import qopt  # noqa: F401 - first: it quiets bitsandbytes' import-time notices

    versions = {name: getattr(__import__(name), "__version__", "?") if name not in missing else None
                for name in NEEDED}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report: dict[str, Any] = {"gpu": gpu, "versions": versions, "missing": missing, "python": platform.python_version(),
                              "cuda": torch.version.cuda, "json": str(args.json)}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print("running tests/test_gpu.py", flush=True)
    report["tests"] = run_tests(args.work_dir, timeout=240) if "pytest" not in missing else \
        {"skipped": "pytest is not installed (NO_INSTALL=1): put it in BNB_PATH (--make-bnb-copy does)"}
    why = None if gpu else "no CUDA device (torch.cuda.is_available() is False)"
    why = why or (f"missing {', '.join(m for m in missing if m != 'pytest')}"
                  if set(missing) - {"pytest"} else None)
    batches = [int(b) for b in args.batches.split(",")]
    report["decode"] = {"skipped": why} if why else {"batches": batches, "results": {}}
    if not why:
        folder = str(write_random_checkpoint(args.work_dir / "opt-1.3b-random", "1.3b"))
        for quant in ("nf4", "int8"):
            runs = report["decode"]["results"].setdefault(quant, {})
            for library in ("qopt", "transformers"):
                if time.perf_counter() - started > args.budget:
                    runs[library] = {"skipped": "time budget"}
                    continue
                print(f"decode {quant} {library}", flush=True)
                runs[library] = _worker("decode", {"folder": folder, "library": library, "quantization": quant,
                                                   "batches": batches, "prompt": args.prompt, "new": args.new,
                                                   "repeats": args.repeats}, timeout=240)
    report["load_6.7b"] = {"skipped": why} if why else {"results": {}}
    if not why:
        if time.perf_counter() - started > args.budget:
            report["load_6.7b"] = {"skipped": "time budget"}
        else:
            print("writing the OPT-6.7B-shaped checkpoint", flush=True)
            folder = str(write_random_checkpoint(args.work_dir / "opt-6.7b-random", "6.7b"))
            for library in ("qopt", "transformers") if args.peer_load else ("qopt",):
                print(f"NF4 load {library}", flush=True)
                report["load_6.7b"]["results"][library] = _worker("load", {"folder": folder, "library": library},
                                                                  timeout=300)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    if args.clean:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    tests = report["tests"]
    return 1 if tests.get("failures") or tests.get("errors") or tests.get("exit_code", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
