"""`qopt generate`: continue a prompt with a model, greedy unless told to sample; or many prompts from a file
on the block schedule of `qopt.generate_many` (`--prompts-file`), written as JSON lines."""
from __future__ import annotations

import argparse

from .common import (
    DEFAULT_MODEL_HELP,
    add_hub,
    add_parser,
    add_placement,
    add_precision,
    check_positions,
    end_load,
    generation_budget,
    hub_options,
    local_folder,
    model_path,
    placement,
    preset,
    show_bars,
    start_load,
)

API_FLAGS = {"max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams"}  # library argument -> this flag


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "generate", "continue a prompt with the model (greedy unless told to sample)")
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                   help=f"the prompt, after an optional MODEL ({DEFAULT_MODEL_HELP}); with --prompts-file only "
                        "the optional MODEL")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) to apply to the model")
    p.add_argument("--ignore-base", action="store_true", help="apply --adapter even to a base it was not made for "
                   "(by default one that differs only by name or folder is accepted, another shape refused)")
    add_precision(p, (4, 8, 16), "4 = --quant-type, 8 = LLM.int8, 16 = unquantized (default: as saved)")
    add_placement(p)
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    g.add_argument("--do-sample", action="store_true", help="sample (implied by --temperature / --top-p)")
    g.add_argument("--temperature", type=float, help="sampling: divide the logits by this (default 1.0)")
    g.add_argument("--top-k", type=int, help="sampling: keep the k likeliest tokens (default 50; 0 = all)")
    g.add_argument("--top-p", type=float, help="sampling: keep the smallest set with this probability mass")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divide repeated tokens' scores by this")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    add_hub(p)
    m = p.add_argument_group("many prompts (each offloaded layer read once per decode step for all of them)")
    m.add_argument("--prompts-file", metavar="FILE",
                   help="prompts, one per line (or JSON lines with a \"prompt\" field, for a .jsonl file)")
    m.add_argument("--batch-size", type=int, default=8, help="prompts per micro-batch")
    m.add_argument("-o", "--output", metavar="FILE.jsonl",
                   help="write {\"prompt\", \"completion\"} JSON lines here (default: standard output)")
    p.set_defaults(handler=run)


def check_decoding(args: argparse.Namespace) -> None:
    """The decoding flags against the ranges `GenerationConfig` accepts, before anything is imported or loaded."""
    checks = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, "an integer >= 0"),
              ("--temperature", args.temperature, args.temperature is None or args.temperature > 0, "a number > 0"),
              ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "a number in (0, 1]"),
              ("--top-k", args.top_k, args.top_k is None or args.top_k >= 0, "an integer >= 0 (0: all tokens)"),
              ("--num-beams", args.num_beams, args.num_beams >= 1, "an integer >= 1"),
              ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0,
               "a number > 0 (1.0: no penalty)"),
              ("--seed", args.seed, args.seed is None or args.seed >= 0, "an integer >= 0"))
    for flag, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{flag} {value}: expected {expected}")


def run(args: argparse.Namespace) -> int:
    check_decoding(args)
    if args.prompts_file:
        from .generate_many import run_many

        return run_many(args)
    if args.output or args.batch_size != 8:
        raise ValueError("--output and --batch-size apply to --prompts-file")
    if not args.words:
        raise ValueError("expected [MODEL] PROMPT (or --prompts-file FILE)")
    if len(args.words) > 2:
        raise ValueError(f"expected [MODEL] PROMPT, got {len(args.words)} arguments; quote the prompt")
    path = model_path(args.words[0] if len(args.words) == 2 else None)
    quantization = preset(args)
    began = start_load(args, path)  # before the imports and placement(), which import torch
    import qopt

    from ..generation.decoding import generate_text
    from ..model.tokenizer import tokenizer_for

    where = placement(args)
    folder = local_folder(path, args.revision)
    tokenizer = tokenizer_for(folder if folder is not None else path)
    prompt_tokens = len(tokenizer.encode(args.words[-1]))
    if folder is not None:  # the prompt's length is known before the load
        check_positions(folder, prompt_tokens, args.max_new_tokens)
    rows = max(1, args.num_beams)  # beam search decodes a row per beam
    budget = generation_budget(args, where, prompt_tokens + args.max_new_tokens, rows)
    model = qopt.load(path, quantization=quantization, progress=show_bars(), **where, **budget, **hub_options(args))
    if args.adapter:
        qopt.load_adapter(model, args.adapter, check_base=not args.ignore_base)
    end_load(args, model, path, began)
    options = {"top_k": args.top_k, "temperature": args.temperature, "top_p": args.top_p}
    sample = args.do_sample or args.temperature is not None or args.top_p is not None
    prompt = args.words[-1]
    print(prompt, end="", flush=True)
    try:
        texts = generate_text(model, tokenizer, prompt,
                              on_text=(lambda t: print(t, end="", flush=True)) if args.stream else None,
                              max_new_tokens=args.max_new_tokens, do_sample=sample, num_beams=args.num_beams,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              **{k: v for k, v in options.items() if v is not None})
    except BaseException:
        print(flush=True)  # an error message starts on its own line, not after the echoed prompt
        raise
    print("" if args.stream else texts[0])
    return 0
