"""What every benchmark JSON records beside its numbers, where it is written, and the peak-anonymous-RSS sampler.

A figure is only worth what is known about the run behind it: each benchmark's JSON holds `meta` (mode, git
commit, CPU model and flags, threads, library versions, load average at the start and the end) next to every run.
Full runs write evals/results/NAME.json (committed; docs/benchmarks.md is rendered from them); `--quick` runs
write evals/results/quick/NAME.json (git-ignored), so a smoke run never replaces a measured figure.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
QUICK_RESULTS = RESULTS / "quick"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub")


def results_path(name: str, quick: bool) -> Path:
    """evals/results/NAME.json for a full run, evals/results/quick/NAME.json for a quick one."""
    return (QUICK_RESULTS if quick else RESULTS) / f"{name}.json"


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), [f for f in CPU_FLAGS if f in have]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def meta(mode: str, threads: int | None = None, **settings: Any) -> dict[str, Any]:
    """The record of the machine and code a benchmark ran on, taken at its start; `finish` adds the end."""
    cpu, flags = _cpu()
    capability = None
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    return {"mode": mode, "git_commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_model": cpu, "cpu_flags": flags, "torch_cpu_capability": capability, "cpu_count": os.cpu_count(),
            "threads": threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "versions": {"qopt": _version("qopt"), "python": platform.python_version(),
                         **{name: _version(name) for name in LIBRARIES}},
            "load_average_start": list(os.getloadavg()), "settings": settings}


def finish(record: dict[str, Any], started: float) -> dict[str, Any]:
    record["load_average_end"] = list(os.getloadavg())
    record["seconds"] = round(time.time() - started, 1)
    return record


def write(name: str, quick: bool, meta_record: dict[str, Any], started: float, path: Path | None = None,
          **payload: Any) -> Path:
    """NAME.json with `meta` (finished now) and the payload; returns its path."""
    path = path or results_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "meta": finish(meta_record, started), **payload}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


def status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    match = re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


class PeakAnon:
    """The highest RssAnon seen, sampled every `interval` seconds by a thread (the kernel keeps a high-water mark
    for the whole RSS, VmHWM, but not for its anonymous part). RssAnon leaves out file-backed pages such as
    memory-mapped checkpoint shards, which the kernel can drop at will."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))
