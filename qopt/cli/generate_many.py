"""`qopt generate MODEL --prompts-file FILE`: many prompts through `qopt.generate_many`, as JSON lines."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import (
    check_positions,
    end_load,
    generation_budget,
    local_folder,
    model_path,
    placement,
    preset,
    show_bars,
    start_load,
    writable_file,
)


def read_prompts(path: str) -> list[str]:
    """One prompt per line; in a `.jsonl` file each line is a JSON string or an object with a "prompt" field."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts-file {path}: line {number} is not JSON ({err.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise ValueError(f"--prompts-file {path}: line {number}: expected a JSON string or an object with a "
                             f"\"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts (expected one per line)")
    return prompts


def run_many(args: argparse.Namespace) -> int:
    if len(args.words) > 1:
        raise ValueError(f"with --prompts-file the only positional argument is MODEL, got {len(args.words)}")
    if args.num_beams != 1 or args.stream:
        raise ValueError("--prompts-file decodes greedily or by sampling: drop --num-beams / --stream")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    writable_file(args.output, "--output")
    prompts = read_prompts(args.prompts_file)
    path = model_path(args.words[0] if args.words else None)
    began = start_load(args, path)  # before the imports and placement(), which import torch
    import qopt

    from ..model.tokenizer import tokenizer_for

    where = placement(args)
    folder = local_folder(path, args.revision)
    tokenizer = tokenizer_for(folder if folder is not None else path)
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    if folder is not None:  # the longest prompt is known before the load
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        check_positions(folder, len(ids[longest]), args.max_new_tokens, f"prompt {longest + 1} of --prompts-file")
    budget = generation_budget(args, where, max(map(len, ids), default=1) + args.max_new_tokens, args.batch_size)
    model = qopt.load(path, quantization=preset(args), progress=show_bars(), **where, **budget)
    if args.adapter:
        qopt.load_adapter(model, args.adapter, check_base=not args.ignore_base)
    end_load(args, model, path, began)
    options = {"top_k": args.top_k, "temperature": args.temperature, "top_p": args.top_p}
    sample = args.do_sample or args.temperature is not None or args.top_p is not None
    began = time.perf_counter()
    outputs = qopt.generate_many(model, ids, batch_size=args.batch_size, progress=True,
                                 max_new_tokens=args.max_new_tokens, do_sample=sample,
                                 repetition_penalty=args.repetition_penalty, seed=args.seed,
                                 **{k: v for k, v in options.items() if v is not None})
    seconds = time.perf_counter() - began
    lines = [json.dumps({"prompt": prompt, "completion": tokenizer.decode(out[len(row):], skip_special_tokens=True)},
                        ensure_ascii=False) for prompt, row, out in zip(prompts, ids, outputs, strict=True)]
    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(tmp, args.output)  # a complete file or none
    else:
        print("\n".join(lines))
    new = sum(len(out) - len(row) for row, out in zip(ids, outputs, strict=True))
    print(f"{len(prompts)} prompts, {new:,} new tokens in {seconds:.1f} s ({new / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0
