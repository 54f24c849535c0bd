"""OPT-30B and OPT-66B at their real size on this machine, through a stand-in for the Hub, each figure beside
what `qopt.plan` / `qopt.download_plan` predicted.

    .venv/bin/python evals/bench_scale.py --quick                     # opt-1.3b, the whole path, minutes
    nohup nice -n 5 .venv/bin/python evals/bench_scale.py --shape 30b > scale-30b.log 2>&1 &

The checkpoints are random float16 with OPT's init in the Hub's `.bin` layout (evals/scale_shards.py): 30B in seven
shards of ~8.6 GB, 66B in fourteen of ~9.3 GB; the stand-in (tests/hub_server.py, its own process) generates
every byte on request, so no shard file exists outside the loader's scratch folder. Parts:
  load        qopt.load(<id>, "nf4", keep_download=False): wall, Mparam/s, peak RssAnon above the post-import
              value (sampled every 5 ms), VmHWM, peak extra disk (HF cache + scratch, sampled every 20 ms)
  generate    8 greedy tokens at batch 1 (the first forward and its 4-bit repack apart)
  perplexity  2 windows of 256 tokens of the bundled WikiText-2 text (a smoke check)
  save        save_pretrained of the NF4 model
  reload      in a fresh process, cold (posix_fadvise DONTNEED first): load + one forward, against a sequential
              16 MiB-block read of the same files, cold too
  offload     66B: device_map="auto", max_memory={"cpu": "16GiB"}, the rest in an offload folder; layer-streamed
              perplexity, generate_many of 8 prompts x 8 tokens, bytes read per token, peak disk
Targets: peak RssAnon of the load <= NF4 model + 1.5 GiB; peak extra disk <= the two largest neighbouring shards;
reload + forward <= 1.5 x the cold read; byte predictions within 5%, activation / peak-RAM estimates within 15%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "evals")]
from bench_hub import disk_bytes  # noqa: E402  (bytes allocated under folders, links counted once)
from hub_server import FakeHub, hub_environment  # noqa: E402

SHAPES = {"30b": ("opt-30b", 7), "66b": ("opt-66b", 14)}
QUICK = {"30b": ("opt-1.3b", 4), "66b": ("opt-1.3b", 4)}
QUICK_CPU = "1200MiB"  # quick offload: 1.3B NF4 (0.83 GiB) beside its budget (2 windows of 256) needs the disk
GIB = 1 << 30
BLOCK = 16 << 20
PARTS = ("load", "generate", "perplexity", "save", "reload", "offload")


def serve(shape: str, shards: int, seed: int) -> None:
    """The stand-in Hub in this process: prints its URL, serves until stdin closes."""
    from scale_shards import build

    repo = build(shape, shards, seed)
    with FakeHub() as hub:
        hub.chunk = 1 << 20
        hub.add_repo(f"facebook/{shape}", repo.files())
        print(hub.url, flush=True)
        sys.stdin.read()


class Server:
    """The stand-in Hub in its own process (so its CPU use and memory are not the measured process's)."""

    def __init__(self, shape: str, shards: int, seed: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", shape, str(shards), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise SystemExit(f"the Hub stand-in did not start (exit {self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


DEADLINE = [float("inf")]  # time.time() by which every child must have finished (--deadline-min)


def child(args: list[str], env: dict[str, str], watch: list[Path]) -> dict:
    """Run evals/scale_child.py with the disk of `watch` sampled every 20 ms; its JSON plus peak_disk. A child
    that fails or runs past the deadline gives what it recorded before (its partial JSON)."""
    peak, done = [0], threading.Event()
    partial = Path(tempfile.mkstemp(prefix="qopt-bench-part-", suffix=".json")[1])
    env = {**env, "QOPT_BENCH_PARTIAL": str(partial)}

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_bytes(watch))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "evals" / "scale_child.py"), *args], env=env, text=True,
                            stdout=subprocess.PIPE)
    try:
        left = DEADLINE[0] - time.time()
        stdout, _ = proc.communicate(timeout=None if left == float("inf") else max(1.0, left))
        failed = f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "") \
            if proc.returncode else ""
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        failed = "stopped at the run's deadline (--deadline-min)"
    finally:
        done.set()
        thread.join()
    text = partial.read_text() if partial.stat().st_size else "{}"
    partial.unlink()
    result = json.loads(stdout.strip().splitlines()[-1]) if not failed else json.loads(text)
    if failed:
        result["failed"] = failed
    result.update(peak_disk=peak[0], process_s=time.perf_counter() - began)
    return result


def drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read(files: list[Path]) -> dict:
    drop_cache(files)
    began, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while block := fh.read(BLOCK):
                total += len(block)
    seconds = time.perf_counter() - began
    drop_cache(files)
    return {"seconds": seconds, "bytes": total, "bytes_per_s": total / seconds}


def machine() -> dict:
    import torch

    import qopt

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = os.environ.get("QOPT_BENCH_COMMIT") or subprocess.run(  # a run from an exported copy names its commit
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], text=True, capture_output=True).stdout
    versions = {}
    for name in ("torch", "bitsandbytes", "accelerate", "huggingface_hub", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 (a missing optional package is reported as such)
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_bytes":
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "git_commit": commit.strip(),
            "qopt": qopt.__version__, "python": platform.python_version(), "versions": versions,
            "load_average": os.getloadavg()}


def run_shape(key: str, quick: bool, parts: set[str], work: Path, seed: int, log) -> dict:
    from scale_shards import build

    shape, shards = (QUICK if quick else SHAPES)[key]
    began = time.perf_counter()
    repo = build(shape, shards, seed)
    sizes = [e["size"] for e in repo.manifest["shards"]]
    result: dict = {"shape": shape, "repo": f"facebook/{shape}", "shards": sizes, "manifest_s":
                    time.perf_counter() - began, "load_average_before": os.getloadavg()}
    log(f"{shape}: {len(sizes)} .bin shards, {sum(sizes) / 1e9:.1f} GB (manifest {result['manifest_s']:.0f} s)")
    server = Server(shape, shards, seed)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        folder = work / key
        if parts & {"load", "generate", "perplexity", "save", "reload"} and key == "30b":
            cache, scratch, saved = folder / "cache", folder / "tmp", folder / "saved"
            scratch.mkdir(parents=True)
            env = {**base, **hub_environment(server, cache), "TMPDIR": str(scratch)}
            # with a reload, decode and perplexity run on the reloaded model (one CPU repack, 30B fits once)
            later = [p for p in ("generate", "perplexity") if p in parts and "reload" in parts]
            wanted = ["save"] * bool({"save", "reload"} & parts) + [p for p in ("generate", "perplexity")
                                                                     if p in parts and p not in later]
            log(f"{shape}: load {'+ ' + ' + '.join(wanted) if wanted else ''}")
            result["load"] = child(["load", result["repo"], shape, str(saved), ",".join(wanted)], env,
                                   [cache, scratch])
            log(json.dumps(result["load"].get("load", result["load"]), default=str))
            shutil.rmtree(cache, ignore_errors=True)
            if "reload" in parts and saved.is_dir():
                files = sorted(p for p in saved.iterdir() if p.is_file())
                result["cold_read"] = cold_read(files)
                log(f"{shape}: cold reload + one forward {'+ ' + ' + '.join(later) if later else ''}")
                result["reload"] = child(["reload", str(saved), ",".join(later)], base, [])
                log(f"cold read {result['cold_read']['seconds']:.1f} s, reload + forward "
                    f"{result['reload'].get('seconds', float('nan')):.1f} s")
            shutil.rmtree(folder, ignore_errors=True)
        if "offload" in parts and key == "66b":
            cache, scratch, offload = folder / "cache", folder / "tmp", folder / "offload"
            scratch.mkdir(parents=True)
            offload.mkdir()
            env = {**base, **hub_environment(server, cache), "TMPDIR": str(scratch)}
            log(f"{shape}: offload load, layer-streamed perplexity, generate_many")
            result["offload"] = child(["offload", result["repo"], shape, str(offload),
                                       QUICK_CPU if quick else "16GiB"], env, [cache, scratch, offload])
            result["offload"]["cpu_limit"] = QUICK_CPU if quick else "16GiB"
            log(json.dumps(result["offload"].get("load", result["offload"]), default=str))
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        server.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=3, metavar=("SHAPE", "SHARDS", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=("30b", "66b", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="opt-1.3b in 4 shards: the whole path in minutes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="scratch (default: a temp folder, removed)")
    parser.add_argument("--json", type=Path, help="default evals/results[/quick]/bench_scale.json")
    parser.add_argument("--deadline-min", type=float, help="stop any part still running this many minutes after "
                                                           "the start, keeping what it recorded")
    parser.add_argument("--table", action="store_true", help="recompute the checks of the JSON and print the table")
    args = parser.parse_args()
    if args.deadline_min:
        DEADLINE[0] = time.time() + 60 * args.deadline_min
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]))
        return
    out = args.json or ROOT / "evals" / "results" / ("quick" if args.quick else "") / "bench_scale.json"
    from scale_report import summarize, table

    results = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        for key in ("30b", "66b"):
            if key in results:
                results[key]["checks"] = summarize(results[key])
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(table(results))
        return
    results.update(machine=machine(), quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="qopt-bench-scale-", dir=args.work))

    def log(line: str) -> None:
        print(time.strftime("%H:%M:%S"), line, flush=True)

    try:
        for key in (("30b", "66b") if args.shape == "both" else (args.shape,)):
            results[key] = run_shape(key, args.quick, set(args.parts), work, args.seed, log)
            results[key].update(machine=results["machine"], checks=summarize(results[key]))  # shapes run apart
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
