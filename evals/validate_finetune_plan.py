"""`qopt plan --finetune` against measured peaks: the load and the training phase of the qopt.finetune path.

Usage:  python evals/validate_finetune_plan.py [--runs 3] [--steps 4] [--only 125m] [--json FILE]
        python evals/validate_finetune_plan.py --from-json FILE | --fit FILE

For each setting (shape, batch x seq, gradient checkpointing, LoRA rank) a fresh process loads a random
OPT-125M- or OPT-350M-shaped checkpoint (bf16 safetensors, written here by qopt) in NF4 as `qopt.finetune`
does (float32 for what stays unquantized, bf16 compute), prepares it for k-bit training, adds LoRA on
q_proj / v_proj, applies `qopt.finetune`'s fast path (`fast_path`: the tied head back in bf16, the fused loss; an
"auto" setting also recomputes only the layers `auto_checkpointing` names) and runs `qopt.finetuning.trainer.train`
for a few steps with AdamW. Peak RSS is VmHWM minus the RSS after the imports (docs/design.md, "Measuring
memory"); the peak is reset through /proc/self/clear_refs after the load, so the load and the training phase
are measured apart in one process. Printed: a markdown table of
the plan's figures against the median of `--runs` processes (with their spread) and the error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [  # shape, batch, seq, gradient checkpointing (True, False or "auto"), r
    ("125m", 4, 128, True, 8), ("125m", 4, 128, False, 8), ("125m", 2, 256, True, 16), ("125m", 8, 64, False, 8),
    ("125m", 1, 256, False, 8), ("125m", 2, 128, True, 4), ("350m", 2, 128, True, 8), ("350m", 2, 128, False, 8),
    ("350m", 4, 128, True, 16), ("350m", 1, 256, True, 8), ("350m", 4, 128, "auto", 8), ("350m", 2, 256, "auto", 16)]
MiB = 2**20


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(folder: str, batch: int, seq: int, checkpointing: bool | str, r: int, steps: int, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (imported before the baseline, as the trainer would)
    import bitsandbytes  # noqa: F401

    import qopt
    from qopt.finetuning.data import LMBlocks
    from qopt.finetuning.lora import LoraConfig, add_lora
    from qopt.finetuning.recipe import prepare_for_kbit_training
    from qopt.finetuning.step_speedups import auto_checkpointing, fast_path
    from qopt.finetuning.trainer import TrainingArguments, train

    base = kib("VmRSS")
    model = qopt.load(folder, quantization="nf4", torch_dtype=None, progress=False)
    load_peak = kib("VmHWM") - base
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the training phase's own peak from here
    prepare_for_kbit_training(model, bool(checkpointing))
    lora = LoraConfig(r=r, lora_alpha=2 * r)
    add_lora(model, lora)
    fast_path(model)  # as qopt.finetune does: the tied head in bf16, the loss through it a chunk at a time
    if checkpointing == "auto":  # and only as many layers recomputed as keep the standard recipe's peak
        model.gradient_checkpointing_enable(layers=auto_checkpointing(model, lora, batch, seq))
    blocks = torch.randint(3, 50000, (batch * (steps + 1), seq), generator=torch.Generator().manual_seed(0))
    train(model, LMBlocks(blocks), None, TrainingArguments(out, max_steps=steps, batch_size=batch, progress=False))
    return {"load": load_peak * 1024, "train": (kib("VmHWM") - base) * 1024,
            "checkpointed": model.get_decoder().checkpointed_layers if bool(checkpointing) else 0}


def write_checkpoint(size: str, folder: Path) -> None:
    import torch

    import qopt
    from qopt.place.plan import config_for

    torch.manual_seed(0)
    model = qopt.OPTForCausalLM(config_for(f"opt-{size}")[0])
    model.init_weights()
    model.to(torch.bfloat16).config.torch_dtype = "bfloat16"
    model.save_pretrained(folder)


def table_row(record: dict, plan: object) -> str:
    """One markdown row: the plan's load and training peaks against the median of the measured runs."""
    cells = []
    for phase, predicted in (("load", plan.host_load_peak), ("train", plan.sizes.total)):
        values = [run[phase] for run in record["runs"]]
        median = statistics.median(values)
        spread = (max(values) - min(values)) / MiB
        cells += [f"{predicted / MiB:.0f} MiB", f"{median / MiB:.0f} MiB ({spread:.0f})",
                  f"{100 * (predicted - median) / median:+.1f}%"]
    gc = record["checkpointing"]
    gc = f"auto: {plan.checkpointed_layers} of {plan.decoder_layers}" if gc == "auto" else "on" if gc else "off"
    return f"| {record['shape']} | {record['batch']} x {record['seq']} | {gc} | {record['r']} | {' | '.join(cells)} |"


def plan_for(record: dict, folder: Path | None = None) -> object:
    from qopt.finetuning.lora import LoraConfig
    from qopt.finetuning.plan import machine_preset, plan_from_configs
    from qopt.finetuning.trainer import TrainingArguments
    from qopt.quant.config import QuantizationConfig

    source = folder or f"opt-{record['shape']}"
    checkpointing = record["checkpointing"]
    if checkpointing == "auto":  # what "auto" chose when the runs were measured (the plan of now may differ)
        checkpointing = record["runs"][0]["checkpointed"]
    lora = LoraConfig(r=record["r"], lora_alpha=2 * record["r"], target_modules=["q_proj", "v_proj"])
    return plan_from_configs(source, machine_preset("cpu"), QuantizationConfig.from_bits(4), lora,
                             TrainingArguments(output_dir="", batch_size=record["batch"]), seq=record["seq"],
                             gradient_checkpointing=checkpointing, shard_size=record.get("shard_bytes"))


def fit(records: list[dict]) -> None:
    """What the RSS holds beyond the plan's live tensors, as a * quantized linears' fp32 bytes + b_on / b_off *
    activations without checkpointing (least squares), and each setting's error when left out of the fit."""
    import numpy as np

    from qopt.finetuning import plan as plan_module

    rows, excess = [], []
    for record in records:
        plan = plan_for(record)
        linears = plan.host_load["retained heap (glibc)"] / plan_module.CPU_HEAP_LOAD
        kept = plan.kept_without_checkpointing
        on = plan.checkpointed_layers / plan.decoder_layers  # the share of layers recomputed
        rows.append([linears, kept * on, kept * (1 - on)])
        excess.append(statistics.median(r["train"] for r in record["runs"]) - (plan.sizes.total - plan.sizes.runtime))
    x, y = np.array(rows), np.array(excess)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    print(f"heap = {coef[0]:.3f} x linears' fp32 bytes + {coef[1]:.3f} (checkpointing on) / {coef[2]:.3f} (off) "
          f"x activations without checkpointing")
    for i, record in enumerate(records):
        keep = np.arange(len(y)) != i
        left_out = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        total = statistics.median(r["train"] for r in record["runs"])
        error = x[i] @ left_out - y[i]
        gc = record["checkpointing"]
        print(f"{record['shape']} {record['batch']} x {record['seq']} checkpointing "
              f"{gc if gc == 'auto' else 'on' if gc else 'off'}: left out, {error / MiB:+.0f} MiB "
              f"({100 * error / total:+.1f}% of the peak)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", help="one shape: 125m or 350m")
    ap.add_argument("--settings", nargs="+", metavar="SHAPE:BATCH:SEQ:CKPT:R",
                    help="other settings than the table's, e.g. 125m:1:256:off:8 (held-out checks of the fit)")
    ap.add_argument("--json", help="also write every run's measurements here")
    ap.add_argument("--from-json", help="print the table for measurements saved by --json, with the plan as it is "
                                        "now (no new runs)")
    ap.add_argument("--fit", help="least-squares fit of the CPU heap constants to measurements saved by --json, "
                                  "with leave-one-out errors")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, batch, seq, gc, r, steps, out = args.child
        print(json.dumps(child(folder, int(batch), int(seq), {"1": True, "0": False}.get(gc, gc), int(r), int(steps),
                               out)))
        return
    if args.fit:
        fit(json.loads(Path(args.fit).read_text()))
        return
    print("| shape | batch x seq | checkpointing | r | load: plan | load: measured | error | training: plan | "
          "training: measured | error |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    if args.from_json:
        for record in json.loads(Path(args.from_json).read_text()):
            print(table_row(record, plan_for(record)))
        return
    settings = [s for s in SETTINGS if not args.only or s[0] == args.only]
    if args.settings:
        settings = [(a, int(b), int(c), {"on": True, "off": False}.get(d, d), int(e))
                    for a, b, c, d, e in (x.split(":") for x in args.settings)]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in dict.fromkeys(s[0] for s in settings):
            folder = Path(tmp) / shape
            write_checkpoint(shape, folder)
            for _, batch, seq, gc, r in [s for s in settings if s[0] == shape]:
                record = {"shape": shape, "batch": batch, "seq": seq, "checkpointing": gc, "r": r, "runs": [],
                          "shard_bytes": (folder / "model.safetensors").stat().st_size}
                for i in range(args.runs):
                    out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(batch), str(seq),
                                          {True: "1", False: "0"}.get(gc, gc), str(r), str(args.steps),
                                          f"{tmp}/out-{shape}-{batch}x{seq}-{gc}-{r}-{i}"],
                                         capture_output=True, text=True, check=True)
                    record["runs"].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(table_row(record, plan_for(record, folder)), flush=True)
                records.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
