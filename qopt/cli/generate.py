"""`qopt generate`: continue a prompt with a model, greedy unless told to sample; or many prompts from a file
on the block schedule of `qopt.generate_many` (`--prompts-file`), written as JSON lines."""
from __future__ import annotations

import argparse

from .common import (DEFAULT_MODEL_HELP, add_hub, add_parser, add_placement, add_precision, generation_budget,
                     hub_options, model_path, placement, preset)


API_FLAGS = {"max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams"}  # library argument -> this flag


def add(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "generate", "continue a prompt with the model (greedy unless told to sample)")
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                   help=f"the prompt, after an optional MODEL ({DEFAULT_MODEL_HELP}); with --prompts-file only "
                        "the optional MODEL")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) to apply to the model")
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


def run(args: argparse.Namespace) -> int:
    import qopt

    from ..generation.decoding import generate_text
    from ..model.tokenizer import tokenizer_for

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
    tokenizer = tokenizer_for(path)
    where = placement(args)
    rows = max(1, args.num_beams)  # beam search decodes a row per beam
    budget = generation_budget(args, where, path, len(tokenizer.encode(args.words[-1])) + args.max_new_tokens, rows)
    model = qopt.load(path, quantization=quantization, progress=False, **where, **budget, **hub_options(args))
    if args.adapter:
        qopt.load_adapter(model, args.adapter)
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
