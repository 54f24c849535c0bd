"""Hub benchmark: `qopt.load(<hub id>, quantization="nf4")` streaming from a local stand-in for the Hub
(tests/hub_server.py) throttled to one rate shared by all connections, against download-then-load and
transformers' `from_pretrained` from the same server.

    .venv/bin/python evals/bench_hub.py --folder /work/tmp/opt-1.3b-synth --rates 100 300

The repo is the synthetic OPT-1.3B-shaped checkpoint of evals/bench_load.py (random float16, shards of at most
500 MB). For each rate (MB/s, decimal) every variant runs in a fresh subprocess with an empty HF cache:
  download          huggingface_hub's snapshot_download alone (the pure download)
  stream            qopt.load(<id>): shards download one after another while the previous one is quantized
  stream-scratch    the same with keep_download=False (scratch folder, at most two shards on disk)
  download+load     snapshot_download, then qopt.load of the downloaded folder
  transformers      transformers' OPTForCausalLM.from_pretrained(<id>, BitsAndBytesConfig NF4)
and, without the server, `load`: qopt.load of the local folder (the pure load). Time is the wall time from the
call to a ready model (process start and imports excluded), the median of --runs runs (transformers: one run).
Peak extra disk is the most bytes the HF cache and the scratch folder held, sampled every 20 ms. The server runs
in this process on the same CPUs (sendfile, so it costs little). Targets: streaming wall <= 1.15 x max(pure
download, pure load); with keep_download=False, peak extra disk <= 2 shards.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hub_server import FakeHub, Throttle, hub_environment, tree_files  # noqa: E402

sys.path.insert(0, str(ROOT / "evals"))
from results_meta import meta, write  # noqa: E402

REPO = "bench/opt-1.3b"
_CHILD = r"""
import json, sys, time, torch
mode, target = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
if mode == "transformers":
    import bitsandbytes
    from transformers import BitsAndBytesConfig, OPTForCausalLM
    import transformers.integrations.bitsandbytes, transformers.quantizers.quantizer_bnb_4bit
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
else:
    import qopt, qopt.loading.loader, qopt.io.download
    from huggingface_hub import snapshot_download
start = time.perf_counter()
if mode == "download":
    snapshot_download(target)
elif mode == "load":
    qopt.load(target, quantization="nf4", torch_dtype=torch.bfloat16, progress=False)
elif mode in ("stream", "stream-scratch"):
    qopt.load(target, quantization="nf4", torch_dtype=torch.bfloat16, progress=False,
              keep_download=mode == "stream")
elif mode == "download+load":
    qopt.load(snapshot_download(target), quantization="nf4", torch_dtype=torch.bfloat16, progress=False)
elif mode == "transformers":
    OPTForCausalLM.from_pretrained(target, quantization_config=config, dtype=torch.bfloat16)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
VARIANTS = ("download", "stream", "stream-scratch", "download+load", "transformers")


def synthetic_checkpoint(folder: Path, shape: str = "1.3b") -> Path:
    """The OPT-shaped checkpoint of bench_load.py (1.3B unless --quick), written once and reused."""
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "evals" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_synthetic_checkpoint(folder, shape)


def disk_bytes(folders: list[Path]) -> int:
    """Bytes allocated under the folders (files only; links to blobs count once, as the blob)."""
    total = 0
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                total += st.st_blocks * 512
    return total


def run(mode: str, target: str, env: dict[str, str], watch: list[Path], threads: int) -> dict:
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_bytes(watch))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, target, str(threads)], env=env, text=True,
                             capture_output=True, check=True)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{mode}: failed\n{err.stderr[-3000:]}") from None
    finally:
        done.set()
        sampler.join()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_disk"] = peak[0]
    return result


def median(runs: list[dict]) -> dict:
    """The run with the median time; all times are kept, and the largest peak disk of any run."""
    middle = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**middle, "runs": [round(r["seconds"], 1) for r in runs], "peak_disk": max(r["peak_disk"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where the synthetic checkpoint is (or goes; default: a folder "
                        "under the temp dir)")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 300], help="MB/s, shared by all connections")
    parser.add_argument("--work", type=Path, help="scratch for caches (default: a temp folder, removed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--json", type=Path, help="default: evals/results[/quick]/bench_hub.json")
    parser.add_argument("--quick", action="store_true", help="OPT-125M shape, 200 MB/s, one run: "
                        "evals/results/quick/bench_hub.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs", type=int, default=1, help="runs per qopt variant and download (median); "
                                                            "transformers runs once")
    args = parser.parse_args()
    shape = "125m" if args.quick else "1.3b"
    if args.quick:
        args.rates, args.runs = [200.0], 1
    started = time.time()
    record = meta("quick" if args.quick else "full", args.threads or None, shape=shape, rates=args.rates,
                  runs=args.runs, variants=args.variants)
    folder = synthetic_checkpoint(args.folder or Path(tempfile.gettempdir()) / f"qopt-bench-hub-{shape}", shape)
    shards = sorted(p.stat().st_size for p in folder.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="qopt-bench-hub-", dir=args.work))
    threads = args.threads or os.cpu_count() or 1
    results: dict = {"shards": len(shards), "largest_shard": shards[-1], "two_largest": sum(shards[-2:]),
                     "total": sum(shards), "rates": {}}
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        print(f"{folder}: {len(shards)} shards, {sum(shards) / 1e9:.2f} GB", flush=True)
        results["load"] = median([run("load", str(folder), base_env, [], threads) for _ in range(args.runs)])
        print(f"pure load: {results['load']['seconds']:.1f} s", flush=True)
        with FakeHub() as hub:
            hub.chunk = 1 << 20
            hub.add_repo(REPO, tree_files(folder, in_memory=False))
            for rate in args.rates:
                row = results["rates"][str(rate)] = {}
                for mode in args.variants:
                    runs = []
                    for _ in range(1 if mode == "transformers" else args.runs):
                        cache, scratch = work / f"{mode}-{rate}" / "cache", work / f"{mode}-{rate}" / "tmp"
                        scratch.mkdir(parents=True)
                        env = {**base_env, **hub_environment(hub, cache), "TMPDIR": str(scratch)}
                        hub.throttle = Throttle(rate * 1e6)
                        runs.append(run(mode, REPO, env, [cache, scratch], threads))
                        shutil.rmtree(work / f"{mode}-{rate}")
                    row[mode] = median(runs)
                    print(f"{rate:.0f} MB/s {mode:15s} {row[mode]['seconds']:6.1f} s (runs {row[mode]['runs']}), "
                          f"peak extra disk {row[mode]['peak_disk'] / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    write("bench_hub", args.quick, record, started, args.json, **results)


def table(results: dict) -> str:
    load = results["load"]["seconds"]
    lines = ["| rate | pure download | pure load | qopt stream | qopt stream, no keep | download then load | "
             "transformers | stream / max(download, load) | peak extra disk (stream / no keep) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate, row in results["rates"].items():
        get = lambda mode, row=row: row[mode]["seconds"] if mode in row else float("nan")  # noqa: E731
        bound = max(get("download"), load)
        disk = (f"{row['stream']['peak_disk'] / 1e9:.2f} / {row['stream-scratch']['peak_disk'] / 1e9:.2f} GB"
                if "stream" in row and "stream-scratch" in row else "")
        lines.append(f"| {float(rate):.0f} MB/s | {get('download'):.1f} s | {load:.1f} s | {get('stream'):.1f} s | "
                     f"{get('stream-scratch'):.1f} s | {get('download+load'):.1f} s | {get('transformers'):.1f} s | "
                     f"{get('stream') / bound:.2f} / {get('stream-scratch') / bound:.2f} | {disk} |")
    lines.append(f"\n{results['shards']} shards, {results['total'] / 1e9:.2f} GB; two largest shards "
                 f"{results['two_largest'] / 1e9:.2f} GB (the no-keep disk target)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
