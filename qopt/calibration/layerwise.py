"""Calibrated quantization: GPTQ rounding applied decoder layer by decoder layer, stored as plain bitsandbytes.

Layer i is calibrated on the outputs of layers < i *as quantized*, so each layer corrects for the error the
earlier ones left (GPTQ's sequential scheme). Within a layer the linears are rounded in the order the data
reaches them (q/k/v, out_proj, fc1, fc2), each on inputs that already went through the rounded ones before it.
From a checkpoint folder only one decoder layer is ever in float: its tensors are read from the shards when
its turn comes and replaced by bitsandbytes modules before the next is read, so a model larger than memory
in float can be calibrated. The result is an ordinary pre-quantized qopt / transformers model.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnbf
from torch import nn
from tqdm.auto import tqdm

from ..bundled import data_dir
from ..io.checkpoint import CheckpointFiles, inspect_checkpoint
from ..io.hub import checkpoint_folder
from ..io.outputs import check_output_folder
from ..loading.loader import AUXILIARY_FILES, read_tensors
from ..loading.saving import save_model
from ..model.config import OPTConfig
from ..model.network import LAYER_PREFIX, OPTForCausalLM
from ..model.tokenizer import OPTTokenizer
from ..place.sizes import meta_model
from ..quant.config import QuantizationConfig
from ..quant.gptq import Grid, HessianAccumulator, RoundedWeight, StopForward, gptq_round, output_error
from ..quant.modules import is_quantized, linear_from_quantized
from ..utils import trim_heap

# linears that read the same input, in the order the data reaches them inside a decoder layer
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                     ("fc1",), ("fc2",))


# -- calibration data ----------------------------------------------------------------------------------------
def default_calibration_sample() -> Path:
    """Text shipped with qopt for calibration: random excerpts of WikiText-2 train and public-domain prose."""
    return data_dir() / "calibration" / "calibration_sample.txt"


def calibration_windows(text: str | None = None, *, count: int = 128, seqlen: int = 256, seed: int = 0,
                        tokenizer=None) -> torch.Tensor:
    """`count` random token windows of `seqlen` from `text` (default: the shipped sample), GPTQ-style.

    The start positions come from a generator seeded with `seed`, so a calibration run is reproducible.
    """
    if tokenizer is None:
        tokenizer = OPTTokenizer.from_pretrained()
    if text is None:
        text = default_calibration_sample().read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if count < 1 or seqlen < 2:
        raise ValueError(f"calibration windows: need count >= 1 and seqlen >= 2, got {count} and {seqlen}")
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (count,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


# -- what each module becomes ----------------------------------------------------------------------------------
@dataclass
class CalibrationConfig:
    """How to calibrate: the storage format (with per-module widths) and GPTQ's knobs."""

    quantization: QuantizationConfig = field(default_factory=lambda: QuantizationConfig.from_name("nf4"))
    percdamp: float = 0.01
    block_columns: int = 128
    clip_search: int = 0  # absmax shrink factors tried per 4-bit block (0 = the block maximum, as bitsandbytes)
    act_order: bool = False  # round columns by decreasing Hessian diagonal (static block absmax)
    true_sequential: bool = True
    batch_tokens: int = 4096  # tokens per layer forward (whole windows, at least one): bounds activation memory
    dtype: torch.dtype = torch.bfloat16  # what stays unquantized (embeddings, norms, biases, 16-bit linears)

    def __post_init__(self) -> None:
        self.quantization = QuantizationConfig.coerce(self.quantization)

    def windows_per_batch(self, seqlen: int) -> int:
        return max(1, self.batch_tokens // seqlen)

    def grid_for(self, name: str) -> Grid | None:
        """The grid the linear called `name` is rounded onto; None when it stays 16-bit."""
        return grid_for_bits(self.quantization.bits_for(name), self.quantization)


def grid_for_bits(bits: int, quantization: QuantizationConfig) -> Grid | None:
    if bits == 16:
        return None
    if bits == 8:
        return Grid("int8")
    return Grid(quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant, quantization.blocksize)


def mixed_precision(base: QuantizationConfig, module_bits: dict[str, int]) -> QuantizationConfig:
    """`base` with per-module widths: 16-bit ones also go to `llm_int8_skip_modules`, which is how transformers
    expresses them (lm_head is listed too: given a list, transformers no longer keeps its default skips)."""
    overrides = {name: bits for name, bits in sorted(module_bits.items()) if bits != base.bits}
    skipped = [name for name, bits in overrides.items() if bits == 16]
    skip = sorted(set(base.llm_int8_skip_modules or []) | set(skipped) | {"lm_head"}) if skipped else \
        base.llm_int8_skip_modules
    return dataclasses.replace(base, module_bits=overrides, llm_int8_skip_modules=skip)


@dataclass
class ModuleReport:
    name: str
    quant_type: str  # nf4 | fp4 | int8 | 16-bit
    parameters: int
    calibrated_error: float = 0.0  # squared output error (summed over outputs) per calibration token
    rtn_error: float = 0.0  # the same for plain round-to-nearest onto the same grid
    reference_energy: float = 0.0  # the same for the float output itself: tr(W H W^T) / 2
    seconds: float = 0.0


@dataclass
class CalibrationReport:
    modules: list[ModuleReport] = field(default_factory=list)
    windows: int = 0
    seqlen: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"windows": self.windows, "seqlen": self.seqlen, "seconds": round(self.seconds, 2),
                "modules": [vars(m) for m in self.modules]}

    def error_ratio(self) -> float | None:
        """Mean over the rounded linears of (calibrated output error / round-to-nearest output error)."""
        ratios = [m.calibrated_error / m.rtn_error for m in self.modules if m.rtn_error > 0]
        return sum(ratios) / len(ratios) if ratios else None

    def summary(self) -> str:
        rounded = sum(1 for m in self.modules if m.quant_type != "16-bit")
        ratio = self.error_ratio()
        return (f"calibrated {rounded} linears on {self.windows} windows of {self.seqlen} tokens in "
                f"{self.seconds:.1f} s; layer output error {ratio:.3f} x round-to-nearest's" if ratio is not None
                else f"calibrated {rounded} linears in {self.seconds:.1f} s")


# -- reading the checkpoint ----------------------------------------------------------------------------------
def _skeleton(path: Path, dtype: torch.dtype) -> tuple[OPTForCausalLM, CheckpointFiles]:
    """The model on meta with everything but the decoder layers read, already in their final `dtype`; each
    layer is read later (`read_tensors`, the loader's rules) when its turn comes."""
    model = meta_model(OPTConfig.from_pretrained(path), None)
    files = inspect_checkpoint(path)
    read_tensors(model, files, lambda n: not n.startswith(LAYER_PREFIX), dtype)
    return model, files


# -- the layer-by-layer driver --------------------------------------------------------------------------------
def _layer0_inputs(model: OPTForCausalLM, windows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the first decoder layer reads for every window (float32) and the causal mask of one window:
    `OPTDecoder.embed`, the same stage `forward` and the layer-major runners start with."""
    decoder = model.model.decoder
    hidden, mask = [], None
    with torch.no_grad():
        for chunk in windows.split(batch):
            states, mask = decoder.embed(decoder.embed_tokens(chunk.to(decoder.embed_tokens.weight.device)), None, 0,
                                         None)
            hidden.append(states.float())
    return torch.cat(hidden), mask[:1]


def _run_layer(layer: nn.Module, inputs: torch.Tensor, mask: torch.Tensor, batch: int,
               out: torch.Tensor | None = None) -> None:
    """The layer over all windows in batches; a hook may end a batch early by raising StopForward."""
    for start in range(0, inputs.shape[0], batch):
        try:
            result = layer(inputs[start:start + batch], mask)[0]
        except StopForward:
            continue
        if out is not None:
            out[start:start + batch] = result


def calibrate(source: str | os.PathLike | OPTForCausalLM, windows: torch.Tensor | None = None,
              config: CalibrationConfig | None = None, *, progress: bool = True,
              device: torch.device | str | None = None) -> tuple[OPTForCausalLM, CalibrationReport]:
    """Quantize an OPT causal LM with GPTQ rounding onto bitsandbytes grids; returns (model, report).

    `source` is a checkpoint folder (streamed: one decoder layer in float at a time) or a float model in
    memory (quantized in place). Layers are calibrated in fp32; everything else is in `config.dtype` from
    the start, so layer 0 sees the embeddings the quantized model will use. `windows` are (count, seqlen) token
    ids (see `calibration_windows`); None draws 128 windows of the model's context (at most 2048 tokens) from
    the shipped sample.

    `device` is where each decoder layer is calibrated (its forwards, Hessians and GPTQ rounding); the layer
    then lives where the model keeps it. None follows the model: each layer computes on the device it is on
    (a folder's layers are read to the CPU).
    """
    config = config or CalibrationConfig()
    started = time.perf_counter()
    if isinstance(source, OPTForCausalLM):
        done = [n for n, m in source.named_modules() if is_quantized(m)]
        if done:
            raise ValueError(f"calibrate needs a float model, but {done[0]} is already quantized")
        model, files = source, None
        _cast_unquantized(model, config.dtype, skip_layers=True)  # as a streamed skeleton has them
        model.model.decoder.layers.float()
    else:
        model, files = _skeleton(checkpoint_folder(source, progress=progress), config.dtype)
        model.name_or_path = os.fspath(source)  # a Hub id stays one: adapters check their base by it
    model.eval()
    if windows is None:
        windows = calibration_windows(seqlen=min(model.config.max_position_embeddings, 2048))
    config = _outside_layers_stay_16bit(model, config)
    decoder = model.model.decoder
    report = CalibrationReport(windows=windows.shape[0], seqlen=windows.shape[1])
    with torch.no_grad():
        hidden, mask = _layer0_inputs(model, windows, config.windows_per_batch(windows.shape[1]))
        where = _layer_device(decoder.layers[0], device)
        hidden, mask = hidden.to(where), mask.to(where)
        spare = torch.empty_like(hidden)
        bar = tqdm(range(len(decoder.layers)), desc="Calibrating layers", unit="layer", disable=not progress)
        for i in bar:
            prefix = f"{LAYER_PREFIX}{i}."
            home = _layer_device(decoder.layers[i], None)
            where = _layer_device(decoder.layers[i], device)
            if files is not None:
                read_tensors(model, files, lambda n, p=prefix: n.startswith(p), torch.float32, where)
            layer = decoder.layers[i].to(where)
            hidden, mask = hidden.to(where), mask.to(where)
            spare = spare.to(where)
            rounded = _calibrate_layer(layer, prefix, hidden, mask, config, report)
            _run_layer(layer, hidden, mask, config.windows_per_batch(windows.shape[1]), out=spare)
            hidden, spare = spare, hidden
            layer.to(home)
            _swap_in_bnb(layer, prefix, rounded, config, report, home)
            _cast_unquantized(layer, config.dtype)
            del rounded, layer
            _release_memory()
    _cast_unquantized(model, config.dtype, skip_layers=True)
    model.tie_weights()
    model.config.quantization_config = config.quantization.to_dict()
    model.config.torch_dtype = str(config.dtype).removeprefix("torch.")
    report.seconds = time.perf_counter() - started
    return model.eval(), report


def calibrate_checkpoint(path: str | os.PathLike, out: str | os.PathLike, config: CalibrationConfig | None = None,
                         *, text: str | None = None, count: int = 128, seqlen: int | None = None, seed: int = 0,
                         max_shard_size: str | int = "2GB", progress: bool = True,
                         overwrite: bool = False, device: torch.device | str | None = None) -> CalibrationReport:
    """What `qopt quantize --method calibrated` runs: calibrate a checkpoint folder and write it pre-quantized.

    `text` replaces the shipped calibration sample; `count` windows of `seqlen` tokens (default: the model's
    context, at most 2048) are drawn with `seed`. The source's tokenizer files are copied beside the weights.
    `out` may not overlap the source, and replaces an existing model only with `overwrite=True`.
    """
    check_output_folder(out, [path], overwrite=overwrite)
    path = checkpoint_folder(path, progress=progress)  # a Hub id: downloaded into the HF cache once
    seqlen = seqlen or min(OPTConfig.from_pretrained(path).max_position_embeddings, 2048)
    windows = calibration_windows(text, count=count, seqlen=seqlen, seed=seed)
    model, report = calibrate(path, windows, config, progress=progress, device=device)
    extras = [Path(path) / name for name in AUXILIARY_FILES if (Path(path) / name).is_file()]
    save_model(model, out, max_shard_size, extra_files=extras)
    return report


def _layer_device(layer: nn.Module, device: torch.device | str | None) -> torch.device:
    """Where a decoder layer computes: `device` if given, else where its weights are (CPU for a layer still on
    the meta device, i.e. one a folder has not read yet)."""
    if device is not None:
        return torch.device(device)
    first = next(layer.parameters(), None)
    return torch.device("cpu") if first is None or first.device.type == "meta" else first.device


def _outside_layers_stay_16bit(model: OPTForCausalLM, config: CalibrationConfig) -> CalibrationConfig:
    """Linears outside the decoder layers (OPT-350M's project_in / project_out) stay 16-bit, as in GPTQ; say
    so in the config, or a loader would expect them quantized."""
    outside = {name: 16 for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.startswith(LAYER_PREFIX)
               and config.quantization.bits_for(name) != 16}
    if not outside:
        return config
    merged = {**config.quantization.module_bits, **outside}
    return dataclasses.replace(config, quantization=mixed_precision(config.quantization, merged))


def _calibrate_layer(layer: nn.Module, prefix: str, hidden: torch.Tensor, mask: torch.Tensor,
                     config: CalibrationConfig, report: CalibrationReport) -> dict[str, RoundedWeight]:
    """Round the layer's linears group by group; each group sees inputs through the groups rounded before it."""
    groups = [[n for n in group if config.grid_for(prefix + n) is not None] for group in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    stages = [[g] for g in groups] if config.true_sequential else [groups]
    rounded: dict[str, RoundedWeight] = {}
    for stage in stages:
        # the linears of a group read the same input, so one Hessian (hooked on the first) serves them all;
        # the last group's hook ends the forward there, since nothing after it is needed yet
        accumulators = [HessianAccumulator(layer.get_submodule(g[0]).in_features, hidden.device) for g in stage]
        handles = [layer.get_submodule(g[0]).register_forward_pre_hook(acc.pre_hook(stop=k == len(stage) - 1))
                   for k, (g, acc) in enumerate(zip(stage, accumulators, strict=True))]
        try:
            _run_layer(layer, hidden, mask, config.windows_per_batch(hidden.shape[1]))
        finally:
            for handle in handles:
                handle.remove()
        for group, acc in zip(stage, accumulators, strict=True):
            for name in group:
                rounded[name] = _round_linear(layer.get_submodule(name), prefix + name, acc.hessian, config, report)
    return rounded


def _round_linear(linear: nn.Linear, name: str, hessian: torch.Tensor, config: CalibrationConfig,
                  report: CalibrationReport) -> RoundedWeight:
    grid = config.grid_for(name)
    tick = time.perf_counter()
    weight = linear.weight.detach().float()
    rounded = gptq_round(weight, hessian, grid, percdamp=config.percdamp, block_columns=config.block_columns,
                         clip_search=config.clip_search, act_order=config.act_order)
    seconds = time.perf_counter() - tick
    entry = ModuleReport(name, grid.quant_type, weight.numel(),
                         calibrated_error=output_error(weight, rounded.dequantized, hessian),
                         rtn_error=output_error(weight, rtn_dequantized(weight, grid), hessian),
                         reference_energy=float(((weight @ hessian) * weight).sum()) / 2, seconds=seconds)
    report.modules.append(entry)
    linear.weight.data = rounded.dequantized  # later groups and layers see the rounded weights
    return rounded


def rtn_dequantized(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """What plain round-to-nearest (bitsandbytes' own quantizer) stores for `weight`, dequantized to fp32."""
    if grid.bits == 8:
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return cb.float() * (scb.unsqueeze(1) / 127.0)
    packed, state = bnbf.quantize_4bit(weight.float(), blocksize=grid.blocksize, quant_type=grid.quant_type,
                                       compress_statistics=grid.double_quant)
    return bnbf.dequantize_4bit(packed, state).float()


def _swap_in_bnb(layer: nn.Module, prefix: str, rounded_weights: dict[str, RoundedWeight],
                 config: CalibrationConfig, report: CalibrationReport, device: torch.device) -> None:
    """Replace each rounded nn.Linear of the layer by the bitsandbytes module holding exactly its bytes."""
    for name in sum(SEQUENTIAL_GROUPS, ()):
        linear = layer.get_submodule(name)
        rounded = rounded_weights.get(name)
        if rounded is None:
            report.modules.append(ModuleReport(prefix + name, "16-bit", linear.weight.numel()))
            continue
        state = {k: v.to(device) for k, v in rounded.state_dict(config.dtype).items()}
        if linear.bias is not None:
            state["bias"] = linear.bias.detach().to(config.dtype)
        layer.set_submodule(name, linear_from_quantized(state, config.quantization, device, source=prefix + name))


def _release_memory() -> None:
    """Hand the freed float layer back to the OS: glibc keeps freed arenas, so a streamed model's RSS would
    otherwise creep up layer after layer."""
    gc.collect()
    trim_heap()


def _cast_unquantized(module: nn.Module, dtype: torch.dtype, skip_layers: bool = False) -> None:
    """Cast float parameters that are not bitsandbytes' to `dtype` (norms, biases, embeddings, 16-bit linears)."""
    for name, param in module.named_parameters():
        if skip_layers and name.startswith(LAYER_PREFIX):
            continue
        if isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)) or not param.dtype.is_floating_point:
            continue
        param.data = param.data.to(dtype)
