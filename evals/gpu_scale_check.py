"""OPT-30B on a 24 GiB GPU, checked against the plan without a checkpoint: the model is built layer by layer
from random tensors on the device (OPT's init: std 0.02, LayerNorm weights 1, biases 0), quantized to NF4 as
`qopt.load` would, the process capped at `--cap` of GPU memory (`torch.cuda.set_per_process_memory_fraction`),
and one greedy generate runs at `--context` tokens; `torch.cuda.max_memory_allocated` is compared with the
plan's GPU total (weights + KV cache + activations). A 60 GB fp16 checkpoint does not fit a GPU machine's disk,
and the weights' values do not change the memory, so none is read.

    python evals/gpu_scale_check.py                         # OPT-30B, 24 GiB cap, context 2048 (a GPU)
    python evals/gpu_scale_check.py --shape opt-125m --context 256 --device cpu   # dry run of the same path

On the CPU the memory comparison is skipped (no allocator statistics); the run proves the path. Prints one
JSON line (also written to --json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30


def build(shape: str, device: torch.device, generator: torch.Generator) -> torch.nn.Module:
    """The model of `shape` on `device`, NF4, from random tensors made one at a time on the device."""
    from accelerate.utils import set_module_tensor_to_device

    from qopt.place.plan import config_for
    from qopt.place.sizes import meta_model
    from qopt.quant.config import QuantizationConfig
    from qopt.quant.modules import is_quantized, owning_module, quantize_weight, set_quantized_state

    config, _ = config_for(shape)
    quant = QuantizationConfig.from_name("nf4")
    model = meta_model(config, quant)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    quantized = {name: m for name, m in model.named_modules() if is_quantized(m)}
    for name, module in quantized.items():
        weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
        weight.normal_(0, 0.02, generator=generator)
        state = quantize_weight(weight, quant, 4, dtype)
        del weight
        if module.bias is not None:
            state["bias"] = torch.zeros(module.out_features, dtype=dtype, device=device)
        set_quantized_state(module, state, device, source=name)
    for name, param in list(model.named_parameters()):
        if owning_module(name, quantized) is not None or param.device.type != "meta":
            continue
        if name.endswith("bias"):
            value = torch.zeros(param.shape, dtype=dtype, device=device)
        elif "layer_norm" in name:
            value = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            value = torch.empty(param.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
        set_module_tensor_to_device(model, name, device, value=value)
    model.tie_weights()
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-30b")
    p.add_argument("--cap", default="24GiB", help="GPU memory the process may use")
    p.add_argument("--context", type=int, default=2048, help="prompt + new tokens")
    p.add_argument("--new", type=int, default=8, help="new tokens (the rest of --context is the prompt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    from qopt.place.plan import plan
    from qopt.utils import parse_size

    device = torch.device(args.device)
    cap = parse_size(args.cap)
    planned = plan(args.shape, 4, {0 if device.type == "cuda" else "cpu": cap}, context=args.context)
    main_device = planned.main_device
    result = {"shape": args.shape, "device": str(device), "cap": cap, "context": args.context, "new": args.new,
              "plan_verdict": planned.verdict, "plan_total_bytes": planned.used_bytes(main_device),
              "plan_weight_bytes": planned.weight_bytes.get(main_device, 0),
              "plan_kv_bytes": planned.kv_cache_bytes.get(main_device, 0),
              "plan_activation_bytes": planned.activation_bytes}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        result["gpu"] = torch.cuda.get_device_name(device)
    generator = torch.Generator(device).manual_seed(0)
    began = time.perf_counter()
    model = build(args.shape, device, generator)
    result["build_s"] = round(time.perf_counter() - began, 1)
    if device.type == "cuda":
        result["resident_after_build_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    prompt = torch.randint(4, model.config.vocab_size, (1, args.context - args.new), generator=generator,
                           device=device)
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.new, do_sample=False)
    result["generate_s"] = round(time.perf_counter() - began, 1)
    result["generated_tokens"] = int(out.shape[1] - prompt.shape[1])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(measured_peak_bytes=peak, peak_over_plan=round(peak / result["plan_total_bytes"], 3),
                      within_cap=peak <= cap)
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
