"""Per-layer sensitivity to 4-bit rounding, and the mixed-precision choice it drives under a memory budget.

Layers do not suffer equally from 4-bit weights: some barely move the model's output, a few dominate the
perplexity loss. Quantizing each linear alone (round-to-nearest, the others in float) and measuring how far
the model's output moves ranks them; given a memory budget the most sensitive are kept in 8 or 16 bits and
the rest go to 4 bits. The sizes are those of the stored bitsandbytes tensors, so the budget holds on disk
and in memory alike.

Two passes rank the linears. `layer_sensitivity` works on a float model in memory and can measure the end-to-end
KL; `streamed_sensitivity` (what `qopt quantize --budget` runs) reads one decoder layer at a time from the
checkpoint, as calibration does, and measures each layer's own output error (see its docstring for why that
ranks alike). A budget is checked against the config before either runs (`check_budget`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import compute_module_sizes
from torch import nn
from tqdm.auto import tqdm

from ..errors import PlanError
from ..io.atomic import atomic_write_text
from ..loading.loader import read_tensors
from ..model.config import OPTConfig
from ..model.network import LAYER_PREFIX, OPTForCausalLM, build_attention_mask
from ..place.sizes import meta_model, quantized_weight_bytes, sizing_view
from ..quant.config import QuantizationConfig
from ..utils import format_bytes, parse_size
from .layerwise import (
    SEQUENTIAL_GROUPS,
    CalibrationConfig,
    _layer0_inputs,
    _release_memory,
    _run_layer,
    _skeleton,
    calibration_windows,
    grid_for_bits,
    mixed_precision,
    rtn_dequantized,
)

METRICS = ("kl", "output", "layer")
DEFAULT_SENSITIVITY_WINDOWS = 16  # ranks the same on other 16 windows (docs/design.md); calibration takes 128


@dataclass
class Sensitivity:
    """How much the model moves when only `name` is rounded to the 4-bit grid."""

    name: str
    parameters: int
    output_error: float | None = None  # mean squared change of the final hidden states / their mean square
    kl: float | None = None  # mean KL(float model || this one) per token, nats (metric "kl")
    nll_increase: float | None = None  # mean NLL on the windows minus the float model's (metric "kl")
    layer_error: float | None = None  # mean squared change of its layer's output / its input's mean square ("layer")

    def score(self, metric: str) -> float:
        value = {"output": self.output_error, "kl": self.kl, "layer": self.layer_error}.get(metric)
        if value is None:
            raise ValueError(f"sensitivity of {self.name} has no {metric!r} measurement")
        return value


def decoder_linear_names(model: OPTForCausalLM | OPTConfig) -> list[str]:
    """Full names of the decoder layers' linears, in data order (the ones calibration quantizes)."""
    layers = model.num_hidden_layers if isinstance(model, OPTConfig) else len(model.model.decoder.layers)
    return [f"{LAYER_PREFIX}{i}.{name}" for i in range(layers) for name in sum(SEQUENTIAL_GROUPS, ())]


@torch.no_grad()
def layer_sensitivity(model: OPTForCausalLM, windows: torch.Tensor, quantization: QuantizationConfig | str = "nf4",
                      *, metric: str = "kl", batch_size: int = 4, progress: bool = True) -> list[Sensitivity]:
    """Quantize each decoder linear alone (round-to-nearest, 4-bit) and measure how far the model moves.

    Only the layers from the quantized one on are rerun, from cached float inputs. "kl": the KL divergence
    of the next-token distributions from the float model's, and the NLL increase, on `windows` (what
    perplexity feels). "output": only the relative squared error of the decoder's final hidden states
    (cheaper: no vocabulary projection, but blind to which directions the head reads). The model must be in
    float; it is restored exactly afterwards.
    """
    if metric not in ("kl", "output"):
        raise ValueError(f"metric {metric!r}: expected 'kl' or 'output' (streamed_sensitivity measures 'layer')")
    grid = grid_for_bits(4, QuantizationConfig.coerce(quantization))
    decoder = model.model.decoder
    was_training = model.training
    model.eval()
    states = _float_states(model, windows, batch_size)  # input of each layer, then the final output
    reference = states[-1]
    results = []
    try:
        for full in tqdm(decoder_linear_names(model), desc="Sensitivity", unit="linear", disable=not progress):
            index = int(full[len(LAYER_PREFIX):].split(".", 1)[0])
            linear = model.get_submodule(full)
            original = linear.weight.data
            linear.weight.data = rtn_dequantized(original, grid).to(original.dtype)
            try:
                output = _run_from(decoder, states[index], index, batch_size)
            finally:
                linear.weight.data = original
            item = Sensitivity(full, original.numel(), float(((output - reference) ** 2).mean() /
                                                             (reference ** 2).mean()))
            if metric == "kl":
                item.kl, item.nll_increase = _divergence(model, reference, output, windows)
            results.append(item)
    finally:
        model.train(was_training)
    return results


def _float_states(model: OPTForCausalLM, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Each decoder layer's input on the windows, then the decoder's output (fp32)."""
    decoder = model.model.decoder
    batches = [decoder(input_ids=chunk, use_cache=False, output_hidden_states=True).hidden_states
               for chunk in windows.split(batch)]
    return [torch.cat([h.float() for h in parts]) for parts in zip(*batches, strict=True)]


def _run_from(decoder: nn.Module, hidden: torch.Tensor, index: int, batch: int) -> torch.Tensor:
    """Decoder layers index.. on cached inputs, then the final norm and projection: the decoder's output."""
    seq = hidden.shape[1]
    mask = build_attention_mask(torch.ones(1, seq, dtype=torch.long), seq, 0)
    outputs = []
    for start in range(0, hidden.shape[0], batch):
        h = hidden[start:start + batch].to(decoder.embed_tokens.weight.dtype)
        for layer in decoder.layers[index:]:
            h = layer(h, mask)[0]
        if decoder.final_layer_norm is not None:
            h = decoder.final_layer_norm(h)
        if decoder.project_out is not None:
            h = decoder.project_out(h)
        outputs.append(h.float())
    return torch.cat(outputs)


def _divergence(model: OPTForCausalLM, reference: torch.Tensor, output: torch.Tensor, windows: torch.Tensor
                ) -> tuple[float, float]:
    """(mean KL(reference || output), mean NLL(output) - NLL(reference)) per predicted token, two windows at
    a time so the fp32 vocabulary logits stay small."""
    kl = nll = 0.0
    count = 0
    head = model.lm_head
    for start in range(0, windows.shape[0], 2):
        labels = windows[start:start + 2, 1:].reshape(-1)
        ref = F.log_softmax(head(reference[start:start + 2, :-1].to(head.weight.dtype)).float(), -1)
        ref = ref.reshape(-1, ref.shape[-1])
        new = F.log_softmax(head(output[start:start + 2, :-1].to(head.weight.dtype)).float(), -1)
        new = new.reshape(-1, new.shape[-1])
        kl += float((ref.exp() * (ref - new)).sum())
        nll += float((ref - new).gather(1, labels[:, None]).sum())
        count += labels.numel()
    return kl / count, nll / count


# -- the streamed pass -----------------------------------------------------------------------------------------
@torch.no_grad()
def streamed_sensitivity(path: str | Path, windows: torch.Tensor, quantization: QuantizationConfig | str = "nf4",
                         *, batch_tokens: int = 4096, progress: bool = True) -> list[Sensitivity]:
    """Rank a checkpoint's decoder linears by their own layer's output error, one float decoder layer at a time.

    Each linear is rounded alone (round-to-nearest, 4-bit) and its decoder layer rerun on the float model's
    inputs to that layer; `layer_error` is the mean squared change of the layer's output (the residual stream)
    over the mean square of the layer's input, fp32 throughout. The layers are read from the shards as
    calibration reads them and dropped after their turn: the peak is one float layer plus the activations
    (the embeddings only until layer 0's inputs exist).

    Why a per-layer error and not `layer_sensitivity`'s end-to-end KL: the KL reruns every later layer and the
    vocabulary head for each linear, so it needs the whole float model in memory and pays a head projection
    over the vocabulary per linear. A change made in layer i travels on along the residual stream, and every
    later layer reads that stream through a layer norm, so what they feel is the change relative to the
    stream's scale; the stream as it entered layer i is that scale without the layer's own output (normalising
    by the output would let a layer that dominates the stream hide its own error). It misses how the later
    layers amplify or damp the change. On the bundled model its ranking follows the KL's (Spearman 0.91, against
    0.80 for the plain squared change and 0.88 relative to the layer's output) and the promoted sets largely
    coincide (docs/design.md).
    """
    grid = grid_for_bits(4, QuantizationConfig.coerce(quantization))
    model, files = _skeleton(Path(path), torch.float32)
    model.eval()
    batch = CalibrationConfig(batch_tokens=batch_tokens).windows_per_batch(windows.shape[1])
    hidden, mask = _layer0_inputs(model, windows, batch)
    model.to("meta")  # embeddings, positions and head are not needed again
    _release_memory()
    output, scratch = torch.empty_like(hidden), torch.empty_like(hidden[:batch])
    changes: list[tuple[str, int, float]] = []
    layers = model.model.decoder.layers
    for i in tqdm(range(len(layers)), desc="Sensitivity", unit="layer", disable=not progress):
        prefix = f"{LAYER_PREFIX}{i}."
        read_tensors(model, files, lambda n, p=prefix: n.startswith(p), torch.float32)
        layer = layers[i]
        scale = float((hidden ** 2).mean())
        _run_layer(layer, hidden, mask, batch, out=output)
        for name in sum(SEQUENTIAL_GROUPS, ()):
            linear = layer.get_submodule(name)
            original = linear.weight.data
            linear.weight.data = rtn_dequantized(original, grid)
            try:
                squared = 0.0
                for start in range(0, hidden.shape[0], batch):
                    part = scratch[:min(batch, hidden.shape[0] - start)]
                    _run_layer(layer, hidden[start:start + batch], mask, batch, out=part)
                    squared += float(((part - output[start:start + batch]) ** 2).sum())
            finally:
                linear.weight.data = original
            changes.append((prefix + name, original.numel(), squared / output.numel() / scale))
        layer.to("meta")
        del layer, original
        hidden, output = output, hidden
        _release_memory()
    return [Sensitivity(name, count, layer_error=change) for name, count, change in changes]


# -- sizes and the budgeted choice ---------------------------------------------------------------------------
def model_bytes(config: OPTConfig, quantization: QuantizationConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the quantized model (per-module widths included), sized as `qopt plan` sizes it."""
    return compute_module_sizes(sizing_view(meta_model(config, quantization), dtype), dtype=dtype)[""]


def check_budget(config: OPTConfig, budget_bytes: int, base: QuantizationConfig | str = "nf4", high_bits: int = 8,
                 dtype: torch.dtype = torch.bfloat16, *, need_choice: bool = True) -> tuple[int, int]:
    """(all-4-bit bytes, bytes with every decoder linear in `high_bits`), from the config alone.

    Raises PlanError when even the all-4-bit model exceeds `budget_bytes`, and (with `need_choice`) when the
    budget holds every decoder linear in `high_bits`: then there is nothing to rank, and a sensitivity pass
    would only cost time. Runs before any weight is read.
    """
    base = QuantizationConfig.coerce(base)
    if base.bits != 4:
        raise ValueError(f"the base format must be 4-bit, got {base.name}")
    if high_bits not in (8, 16):
        raise ValueError(f"high_bits must be 8 or 16, got {high_bits}")
    all_high_config = mixed_precision(base, dict.fromkeys(decoder_linear_names(config), high_bits))
    all_4bit, all_high = model_bytes(config, base, dtype), model_bytes(config, all_high_config, dtype)

    def size(n: int) -> str:
        return f"{format_bytes(n)} ({n:,} bytes)"

    if all_4bit > budget_bytes:
        raise PlanError(f"budget {size(budget_bytes)} is below the all-4-bit ({base.name}) model's "
                        f"{size(all_4bit)}: no mix of 4-bit and {high_bits}-bit fits it")
    if need_choice and all_high <= budget_bytes:
        instead = "quantize with --bits 8 (no --budget)" if high_bits == 8 else "keep the model unquantized"
        raise PlanError(f"budget {size(budget_bytes)} already holds every decoder linear in {high_bits}-bit "
                        f"({size(all_high)}; all-4-bit {size(all_4bit)}): no choice to make; {instead}")
    return all_4bit, all_high


def _weight_bytes(linear: nn.Module, bits: int, double_quant: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    if bits == 16:
        return linear.in_features * linear.out_features * torch.empty(0, dtype=dtype).element_size()
    return quantized_weight_bytes(linear.out_features, linear.in_features, bits, double_quant and bits == 4)


@dataclass
class PrecisionPlan:
    """Which width each decoder linear gets, and what the model then weighs."""

    quantization: QuantizationConfig  # the 4-bit base with the promoted linears in `module_bits`
    total_bytes: int
    budget_bytes: int
    all_4bit_bytes: int
    all_high_bytes: int = 0  # every decoder linear in the high width

    def promoted(self) -> list[str]:
        return sorted(self.quantization.module_bits)


def choose_precision(model: OPTForCausalLM, sensitivities: list[Sensitivity], budget_bytes: int,
                     base: QuantizationConfig | str = "nf4", high_bits: int = 8, metric: str = "kl",
                     dtype: torch.dtype = torch.bfloat16) -> PrecisionPlan:
    """Keep the most sensitive linears in `high_bits` (8 or 16) while the model fits `budget_bytes`.

    Linears are visited from the most to the least sensitive; each is promoted if its extra bytes still fit
    (a big one that does not fit is passed over for smaller, less sensitive ones). Raises PlanError when even
    the all-4-bit model exceeds the budget. `model` may be on the meta device: only its shapes are read.
    """
    base = QuantizationConfig.coerce(base)
    all_4bit, all_high = check_budget(model.config, budget_bytes, base, high_bits, dtype, need_choice=False)
    linears = set(decoder_linear_names(model))
    total = all_4bit
    promoted: dict[str, int] = {}
    for item in sorted(sensitivities, key=lambda s: s.score(metric), reverse=True):
        if item.name not in linears:
            raise ValueError(f"sensitivity names {item.name!r}, which is not a decoder linear of this model")
        linear = model.get_submodule(item.name)
        double = base.bnb_4bit_use_double_quant
        extra = _weight_bytes(linear, high_bits, double, dtype) - _weight_bytes(linear, 4, double)
        if total + extra <= budget_bytes:
            promoted[item.name] = high_bits
            total += extra
    quantization = mixed_precision(base, promoted)
    return PrecisionPlan(quantization, model_bytes(model.config, quantization, dtype), budget_bytes, all_4bit,
                         all_high)


def plan_for_checkpoint(path: str | Path, budget: int | str, base: QuantizationConfig | str = "nf4",
                        high_bits: int = 8, *, text: str | None = None, sample: int = DEFAULT_SENSITIVITY_WINDOWS,
                        seqlen: int | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        progress: bool = True) -> PrecisionPlan:
    """What `qopt quantize --budget` runs: check `budget` against the config, rank the checkpoint's linears on
    `sample` calibration windows of `seqlen` tokens (`streamed_sensitivity`) and fit them to it.

    A budget below the all-4-bit model, or one that holds every linear in `high_bits`, fails (PlanError) before
    a weight is read. `dtype` is that of the tensors left unquantized, which the sizes count.
    """
    config = OPTConfig.from_pretrained(path)
    budget_bytes = parse_size(budget)
    check_budget(config, budget_bytes, base, high_bits, dtype)
    seqlen = seqlen or min(config.max_position_embeddings, 2048)
    windows = calibration_windows(text, count=sample, seqlen=seqlen, seed=seed)
    ranking = streamed_sensitivity(path, windows, base, progress=progress)
    return choose_precision(meta_model(config, None), ranking, budget_bytes, base, high_bits, "layer", dtype)


def save_sensitivities(path: str | Path, sensitivities: list[Sensitivity], meta: dict | None = None) -> None:
    data = {"meta": meta or {}, "layers": [asdict(s) for s in sensitivities]}
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def load_sensitivities(path: str | Path) -> list[Sensitivity]:
    try:
        data = json.loads(Path(path).read_text())
        return [Sensitivity(**entry) for entry in data["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a sensitivity report written by qopt ({err})") from None
