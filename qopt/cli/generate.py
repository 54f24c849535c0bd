"""`qopt generate`: continue a prompt with a model, greedy unless told to sample."""
from __future__ import annotations

import argparse

from .common import DEFAULT_MODEL_HELP, model_path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with the model (greedy unless told to sample)")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help=f"the prompt, after an optional {DEFAULT_MODEL_HELP}")
    p.add_argument("--bits", type=int, choices=(4, 8, 16),
                   help="4 = --quant-type, 8 = LLM.int8, 16 = bf16 (default: as saved, float in bf16)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format (default nf4)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true", help="sample (implied by --temperature / --top-p)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, help="sampling: keep the k likeliest tokens (default 50; 0 = all)")
    p.add_argument("--top-p", type=float, help="sampling: keep the smallest set with this probability mass")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import qopt

    from ..generation.decoding import generate_text
    from ..model.tokenizer import tokenizer_for

    if len(args.words) > 2:
        raise ValueError(f"expected [MODEL] PROMPT, got {len(args.words)} arguments; quote the prompt")
    path = model_path(args.words[0] if len(args.words) == 2 else None)
    quantization = {4: args.quant_type, 8: "int8", 16: None, None: None}[args.bits]
    model = qopt.load(path, quantization=quantization, torch_dtype="bfloat16", progress=False)
    tokenizer = tokenizer_for(path)
    options = {"top_k": args.top_k, "temperature": args.temperature, "top_p": args.top_p}
    sample = args.do_sample or args.temperature is not None or args.top_p is not None
    prompt = args.words[-1]
    print(prompt, end="", flush=True)
    texts = generate_text(model, tokenizer, prompt, on_text=(lambda t: print(t, end="", flush=True)) if args.stream
                          else None, max_new_tokens=args.max_new_tokens, do_sample=sample, num_beams=args.num_beams,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          **{k: v for k, v in options.items() if v is not None})
    print("" if args.stream else texts[0])
    return 0
