"""Time and peak memory of calibrated quantization (streaming from a checkpoint folder), per model shape.

Usage:
    python calibration/calibration_cost.py --shape bundled --windows 128 --seqlen 256
    python calibration/calibration_cost.py --shape opt-350m --windows 32 --seqlen 512   # random weights

`--shape bundled` uses the shipped model and a folder path uses that checkpoint; any other shape (opt-125m,
opt-350m, opt-1.3b, ...) gets random weights written as a 16-bit checkpoint in a temporary folder (timing and
memory do not depend on the values).
The calibration runs in a fresh subprocess; peak RSS is its VmHWM minus its RSS right after the imports
(docs/design.md, "Measuring memory"), so the file-backed pages of the memory-mapped shards count while a layer is read.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qopt.bundled import bundled_model_dir
from qopt.model.network import OPTForCausalLM
from qopt.place.plan import config_for

CHILD = r"""
import json, resource, sys, time, torch
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from qopt.calibration.layerwise import CalibrationConfig, calibrate
from qopt.quant.config import QuantizationConfig
args = json.loads(sys.argv[1])
torch.set_num_threads(args['threads'])
windows = torch.randint(3, 50000, (args['windows'], args['seqlen']), generator=torch.Generator().manual_seed(0))
base = rss('VmRSS:')
began = time.perf_counter()
model, report = calibrate(args['path'], windows, CalibrationConfig(quantization=args['format']), progress=False)
seconds = time.perf_counter() - began
peak = rss('VmHWM:')
print(json.dumps({'seconds': seconds, 'peak_bytes': peak - base, 'after_imports_bytes': base,
                  'linears': len(report.modules), 'error_ratio': report.error_ratio()}))
"""


def random_checkpoint(shape: str, folder: Path) -> Path:
    config, _ = config_for(shape)
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    model.init_weights()
    model.to(torch.bfloat16).save_pretrained(folder / shape)
    return folder / shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bundled")
    ap.add_argument("--format", default="nf4")
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "bundled" or Path(args.shape).is_dir():
            path = bundled_model_dir() if args.shape == "bundled" else Path(args.shape)
        else:
            path = random_checkpoint(args.shape, Path(tmp))
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        child = {"path": str(path), "format": args.format, "windows": args.windows, "seqlen": args.seqlen,
                 "threads": args.threads}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child)], check=True, capture_output=True,
                             text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(shape=args.shape, format=args.format, windows=args.windows, seqlen=args.seqlen,
                  threads=args.threads, checkpoint_bytes=size)
    print(json.dumps(result))
    print(f"{args.shape}: {args.format}, {args.windows} windows x {args.seqlen} tokens, {args.threads} thread(s): "
          f"{result['seconds']:.1f} s, peak RSS {result['peak_bytes'] / 2**20:.0f} MiB above imports "
          f"(checkpoint {size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
