"""Pretraining recipe of qopt's bundled model: a small pre-LN OPT on WikiText-2 train + public-domain prose.

Usage (resumes from --state if a checkpoint is there; never reads the WikiText-2 test split):
    python evals/pretrain_bundled_model.py --data ../shared/data --state ~/.cache/qopt-pretrain \
        --out qopt/data/model --steps 1800

The state folder holds model, optimizer, step and RNG states, written atomically every --save-every steps,
so a killed run continues where its last checkpoint left it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from qopt import OPTConfig, OPTForCausalLM, OPTTokenizer
from qopt.evaluation.perplexity import wikitext_join
from qopt.io.atomic import atomic_write_text

MODEL = dict(vocab_size=50272, hidden_size=256, num_hidden_layers=6, ffn_dim=1024, num_attention_heads=4,
             max_position_embeddings=256, dropout=0.0, do_layer_norm_before=True, word_embed_proj_dim=256)
TRAIN_FILES = ["wikitext-2-tokenized/wiki.train.tokens"] + [
    f"pretrain_prose/{n}" for n in ("pg11_alice_in_wonderland.txt", "pg1342_pride_and_prejudice.txt",
                                    "pg1661_adventures_of_sherlock_holmes.txt", "pg2701_moby_dick.txt",
                                    "pg84_frankenstein.txt", "tinyshakespeare_input.txt")]
VALID_FILE = "wikitext-2-raw/wiki.valid.raw"


def token_stream(tok: OPTTokenizer, data: Path, files: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for name in files:
        text = (data / name).read_text(encoding="utf-8")
        if name.startswith("wikitext"):
            text = wikitext_join(text)
        ids += tok.encode(text)  # each document starts with </s>, as OPT's training data does
    return torch.tensor(ids, dtype=torch.int32)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: OPTForCausalLM, valid: torch.Tensor, seq: int, windows: int = 40) -> float:
    model.eval()
    losses = []
    for i in range(min(windows, len(valid) // seq)):
        x = valid[i * seq:(i + 1) * seq].long()[None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(x, labels=x).loss.item())
    model.train()
    return math.exp(sum(losses) / len(losses))


def save_state(state_dir: Path, model, optimizer, step: int, log: list) -> None:
    tmp = state_dir / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
                "rng": torch.get_rng_state()}, tmp)
    tmp.replace(state_dir / "state.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--state", type=Path, default=Path.home() / ".cache" / "qopt-pretrain")
    ap.add_argument("--out", type=Path, default=Path("qopt/data/model"))
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.state.mkdir(parents=True, exist_ok=True)
    tok = OPTTokenizer.from_pretrained()
    train = token_stream(tok, args.data, TRAIN_FILES)
    valid = token_stream(tok, args.data, [VALID_FILE])
    print(f"train tokens {len(train):,}  valid tokens {len(valid):,}", flush=True)

    torch.manual_seed(args.seed)
    config = OPTConfig(**MODEL)
    model = OPTForCausalLM(config)
    model.init_weights()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    step, log = 0, []
    if (args.state / "state.pt").exists():
        saved = torch.load(args.state / "state.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        model.tie_weights()
        optimizer.load_state_dict(saved["optimizer"])
        step, log = saved["step"], saved["log"]
        torch.set_rng_state(saved["rng"])
        print(f"resumed at step {step}", flush=True)
    model.train()
    windows = len(train) // args.seq
    tokens_per_step = args.batch * args.seq
    t0, seen = time.time(), 0
    while step < args.steps:
        # the window order is a pure function of (seed, step), so a resumed run reads the same batches
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        starts = torch.randint(0, windows - 1, (args.batch,), generator=g) * args.seq
        x = torch.stack([train[s:s + args.seq] for s in starts.tolist()]).long()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += tokens_per_step
        if step % 10 == 0:
            rate = seen / (time.time() - t0)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} lr {group['lr']:.2e} {rate:.0f} tok/s",
                  flush=True)
        if step % args.save_every == 0 or step == args.steps:
            entry = {"step": step, "train_loss": round(loss.item(), 4)}
            if step % (args.save_every * 4) == 0 or step == args.steps:
                entry["valid_ppl_40x256"] = round(evaluate(model, valid, args.seq), 2)
                print(entry, flush=True)
            log.append(entry)
            save_state(args.state, model, optimizer, step, log)

    model.eval()
    model.half().save_pretrained(args.out)
    summary = {"steps": step, "batch": args.batch, "seq": args.seq, "tokens_seen": step * tokens_per_step,
               "train_tokens": len(train), "lr": args.lr, "warmup": args.warmup, "files": TRAIN_FILES, "log": log}
    atomic_write_text(args.out / "training_log.json", json.dumps(summary, indent=2) + "\n")
    print("saved", args.out, flush=True)


if __name__ == "__main__":
    main()
