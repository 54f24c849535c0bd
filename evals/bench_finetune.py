"""QLoRA training step: qopt against transformers + peft on the same random checkpoint, in fresh processes.

Usage:  python evals/bench_finetune.py [--shape small|125m|350m] [--steps 10] [--threads 1] [--rounds 3]
        python evals/bench_finetune.py --quick      # small shape, 1 step, 1 round: evals/results/quick/

Each side runs in its own subprocess: load the checkpoint in NF4 (bf16 compute), prepare it for k-bit training
(gradient checkpointing on), add LoRA r=8 on q_proj / v_proj, then time forward + backward + AdamW steps on
batch x seq random tokens. Sides: qopt's default `qopt.finetune` path ("ours": the frozen tied head kept in
bf16, the loss through it a chunk at a time, and only as many layers recomputed as keep the planned peak within
the standard recipe's; "ours-ckpt": the same with every layer recomputed), qopt with PEFT's all-fp32 recipe
("plain"), transformers + peft's standard recipe
("peer": prepare_model_for_kbit_training), the same without recomputation ("peer-nockpt":
prepare_model_for_kbit_training(use_gradient_checkpointing=False), PEFT's fastest setting where everything fits,
as it does at 125M / 350M) and transformers + peft without the k-bit preparation ("peer-noprep": bf16
throughout, checkpointing switched on by hand). `--rounds` repeats them in turn, so each round's runs see
the same machine load, and the medians over rounds are printed: step time, tokens/s, trainable parameters,
layers recomputed and peak RSS above the RSS after imports (VmHWM, load included; docs/design.md, "Measuring
memory") beside peak RssAnon (anonymous memory only, sampled every 5 ms: glibc's retained heap moves VmHWM
between runs), and the ratios to the peer and to PEFT's fastest setting. Every run goes into
evals/results/bench_finetune_SHAPE.json (--quick: evals/results/quick/) with the machine's record. Take timings
on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import PeakAnon, meta, write  # noqa: E402

SHAPES = {"small": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4),
          "125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
          "350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                       word_embed_proj_dim=512, do_layer_norm_before=False)}
SIDES = ("ours", "ours-ckpt", "plain", "peer", "peer-nockpt", "peer-noprep")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_side(side: str, folder: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if side in ("ours", "ours-ckpt", "plain"):
        import qopt
        from qopt.finetuning.lora import LoraConfig, add_lora, trainable_parameters
        from qopt.finetuning.recipe import prepare_for_kbit_training
        from qopt.finetuning.step_speedups import auto_checkpointing, fast_path
    else:
        import peft
        import transformers
        from transformers.integrations import bitsandbytes  # noqa: F401  (imported lazily otherwise)
    base_rss, base_anon = rss_kib("VmRSS"), rss_kib("RssAnon")
    anon = PeakAnon().__enter__()
    if side in ("ours", "ours-ckpt", "plain"):
        model = qopt.load(folder, quantization="nf4", torch_dtype=torch.bfloat16, progress=False)
        prepare_for_kbit_training(model)
        lora = LoraConfig(r=8, lora_alpha=16)
        add_lora(model, lora)
        if side != "plain":  # what qopt.finetune does by default ("ours-ckpt": still every layer recomputed)
            fast_path(model)
        if side == "ours":
            model.gradient_checkpointing_enable(layers=auto_checkpointing(model, lora, batch, seq))
        trainable = trainable_parameters(model)[0]
    else:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.OPTForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16)
        if side == "peer":
            model = peft.prepare_model_for_kbit_training(model)
        elif side == "peer-nockpt":  # PEFT's fastest setting: nothing recomputed
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:  # peft without the k-bit preparation: bf16 everywhere, checkpointing switched on by hand
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 50000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    decoder = model.get_decoder() if side in ("ours", "ours-ckpt", "plain") else None
    checkpointed = decoder.checkpointed_layers if decoder is not None else -1 if side != "peer-nockpt" else 0
    anon.__exit__()
    return {"step_s": step, "tokens_per_s": batch * seq / step, "trainable": trainable, "checkpointed": checkpointed,
            "peak_rss_mib": (rss_kib("VmHWM") - base_rss) / 1024, "peak_anon_mib": anon.peak / 2**20 - base_anon / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side, taking turns")
    ap.add_argument("--quick", action="store_true", help="small shape, 1 step, 1 round; writes "
                    "evals/results/quick/bench_finetune_small.json")
    ap.add_argument("--json", help="default: evals/results[/quick]/bench_finetune_SHAPE.json")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # the subprocess' role
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.folder, args.steps, args.batch, args.seq, args.threads)))
        return
    import torch
    import transformers

    if args.quick:
        args.shape, args.steps, args.rounds = "small", 1, 1
    started = time.time()
    record = meta("quick" if args.quick else "full", args.threads, shape=args.shape, steps=args.steps,
                  batch=args.batch, seq=args.seq, rounds=args.rounds, lora="r=8 alpha=16 q_proj,v_proj")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = transformers.OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SHAPES[args.shape])
        transformers.OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side in runs:
                out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", folder, "--steps",
                                      str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
        results = {side: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for side, rs in runs.items()}
    print(f"QLoRA step, OPT {args.shape} shape, NF4 + bf16 compute, r=8 q/v, batch {args.batch} x {args.seq}, "
          f"{args.threads} thread(s)")
    print(f"{'':12s} {'step s':>8s} {'tokens/s':>9s} {'trainable':>10s} {'recomputed':>10s} {'peak RSS MiB':>13s} "
          f"{'peak anon MiB':>14s}  (median of {args.rounds} round(s))")
    for side, r in results.items():
        layers = "all" if r["checkpointed"] < 0 else f"{int(r['checkpointed'])}"
        print(f"{side:12s} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {int(r['trainable']):10,d} {layers:>10s} "
              f"{r['peak_rss_mib']:13.0f} {r['peak_anon_mib']:14.0f}")
    for peer_name in ("peer", "peer-nockpt"):
        peer = results[peer_name]
        for side in ("ours", "ours-ckpt", "plain", "peer-noprep"):
            print(f"{side}: {peer['step_s'] / results[side]['step_s']:.2f}x {peer_name}'s speed, "
                  f"{results[side]['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x its peak RSS, "
                  f"{results[side]['peak_anon_mib'] / peer['peak_anon_mib']:.2f}x its peak RssAnon")
    write(f"bench_finetune_{args.shape}", args.quick, record, started, Path(args.json) if args.json else None,
          shape=args.shape, batch=args.batch, seq=args.seq, threads=args.threads, runs=runs, medians=results)


if __name__ == "__main__":
    main()
