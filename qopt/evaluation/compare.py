"""`compare_precisions`: one checkpoint loaded at each precision and measured on WikiText-2 (perplexity, KL and
top-1 agreement against a reference in the same compute dtype, weight memory). A "-calibrated" precision is
calibrated here with the shipped sample and a fixed seed, so round-to-nearest and calibrated weights are
judged in one run against the same reference.
"""
from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import bitsandbytes
import torch
from torch import nn

from .. import __version__
from ..calibration.layerwise import CalibrationConfig, calibrate
from ..finetuning.adapters import load_adapter
from ..io.hub import checkpoint_folder
from ..loading.loader import load
from ..model.config import OPTConfig
from ..model.tokenizer import own_tokenizer
from ..quant.config import QuantizationConfig
from .footprint import weight_footprint
from .perplexity import cut_windows, describe_windows, evaluate_ids, text_ids
from .precisions import DEFAULT_PRECISIONS, quantized_compute, reference_for, split_calibrated
from .report import UNQUANTIZED, ComparisonReport, PrecisionRow


def load_precision(path: str | os.PathLike, precision: str, placement: dict[str, Any] | None = None,
                   adapter: str | os.PathLike | None = None, check_base: bool = True,
                   load_progress: bool = False, compute: str | None = None) -> nn.Module:
    """The model at `precision` (placed as `placement`, `qopt.load`'s device_map / max_memory / offload_folder
    say), with `adapter` applied (`check_base` as in `load_adapter`); a calibrated one is calibrated here (its
    time counts as load time). `load_progress` shows the load's bar. A quantized one computes in `compute`
    (default: `quantized_compute()`, this machine's fast dtype)."""
    placement = placement or {}
    compute = compute or quantized_compute()
    stored = _stored_quantization(path)
    if stored is not None and precision == stored.label:
        precision = stored.name  # a mixed checkpoint loads as saved: its base preset restates the format
    preset, calibrated = split_calibrated(precision)
    if precision in UNQUANTIZED:
        model = load(path, torch_dtype=UNQUANTIZED[precision], progress=load_progress, **placement)
    elif not calibrated:
        model = load(path, quantization=preset, torch_dtype=UNQUANTIZED[compute], progress=load_progress,
                     **placement)
    else:
        config = CalibrationConfig(quantization=preset, dtype=UNQUANTIZED[compute])
        model, _ = calibrate(path, None, config, progress=False)
    if adapter is not None:
        load_adapter(model, adapter, check_base=check_base)
    return model


def _stored_quantization(path: str | os.PathLike) -> QuantizationConfig | None:
    data = OPTConfig.from_pretrained(path).quantization_config
    return QuantizationConfig.from_dict(data, f"{path}: quantization_config") if data else None


def stored_precision(path: str | os.PathLike) -> str | None:
    """What a pre-quantized checkpoint is measured as: its preset ("nf4", ...), or "nf4+int8 mixed" for a
    mixed-width one (a mixed model is not its base preset); None for a float one."""
    stored = _stored_quantization(path)
    return stored.label if stored else None


def _environment() -> dict[str, Any]:

    return {"qopt": __version__, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}


def _run_order(precisions: Sequence[str], reference: bool, stored: str | None = None,
               compute: str = "bf16") -> list[str]:
    """Unquantized first so references exist before what they judge; `compute` (the quantized models' dtype) is
    added if a quantized one needs it as its reference."""
    names = list(dict.fromkeys(precisions))
    if not names:
        raise ValueError("precisions: expected at least one precision")
    for name in names:
        if name not in UNQUANTIZED and name != stored:  # an unknown name fails here, before any model is loaded
            QuantizationConfig.from_name(split_calibrated(name)[0])
    if reference and any(p not in UNQUANTIZED for p in names) and compute not in names:
        names.append(compute)
    return sorted(names, key=lambda p: (p not in UNQUANTIZED, p != "fp32"))


def compare_precisions(model_path: str | os.PathLike, precisions: Sequence[str] = DEFAULT_PRECISIONS,
                       seqlen: int | None = None, max_windows: int | None = None, stride: int | None = None,
                       tokenizer: Any = None, reference: bool = True, text: str | None = None,
                       progress: bool = True, placement: dict[str, Any] | None = None,
                       adapter: str | os.PathLike | None = None,
                       on_model: Callable[[str, nn.Module], None] | None = None, check_base: bool = True,
                       load_progress: bool = False, compute: str | None = None) -> ComparisonReport:
    """Load `model_path` at each precision and measure it; see the module docstring for what a row holds.

    With `reference`, every quantized precision is judged against bf16 (added if missing) and bf16 / fp16
    against fp32 when fp32 is in the list; a reference model stays loaded only while something still needs it.
    `placement` (device_map, max_memory, offload_folder, stream_from_host) and `adapter` apply to every precision
    alike (`check_base` as in `load_adapter`; `load_progress` shows each load's bar).
    `on_model(precision, model)` is called with each model after its measurement (the gate hashes its state).
    `compute`: the dtype quantized models compute in (bf16 | fp32; default: decided for this machine by
    `quantized_compute`, and said in one line); the report's settings record it, so a gate reruns in its own.
    """
    compute = compute or quantized_compute()
    if progress:
        print(f"quantized precisions compute in {compute}" + ("" if compute == "bf16" else
              " (this CPU has no fast bf16 matmuls: no AVX512-BF16 or AMX)"), flush=True)
    requested_model, model_path = str(model_path), checkpoint_folder(model_path, progress=progress)  # Hub id: once
    stored = stored_precision(model_path)
    order = _run_order(precisions, reference, stored, compute)
    if stored is not None and order != [stored]:
        raise ValueError(f"{model_path} is already quantized ({stored}): it can be measured only as {stored}, "
                         f"without references (compare precisions on its float checkpoint)")
    limit = OPTConfig.from_pretrained(model_path).max_position_embeddings
    if seqlen is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds {model_path}'s max_position_embeddings ({limit})")
    seqlen = seqlen or limit
    ids = text_ids(text, tokenizer or own_tokenizer(model_path))
    windows = cut_windows(int(ids.numel()), seqlen, stride, max_windows)
    if progress:
        print(describe_windows(int(ids.numel()), seqlen, stride, max_windows), flush=True)
    refs_needed = {p: reference_for(p, order, compute) if reference else None for p in order}
    loaded: dict[str, nn.Module] = {}
    report = ComparisonReport(requested_model, {"precisions": list(order), "seqlen": seqlen, "stride": stride,
                                                "windows": max_windows, "reference": reference,
                                                "compute": compute},
                              int(ids.numel()), len(windows), sum(w.scored for w in windows),
                              environment=_environment())
    for i, precision in enumerate(order):
        began = time.perf_counter()
        model = load_precision(model_path, precision, placement, adapter, check_base, load_progress, compute)
        load_seconds = time.perf_counter() - began
        ref_name = refs_needed[precision]
        result = evaluate_ids(model, ids, seqlen, stride, max_windows, progress,
                              reference=loaded.get(ref_name) if ref_name else None, desc=precision)
        foot = weight_footprint(model)  # after the evaluation: 4-bit layers are in their repacked state
        if on_model is not None:
            on_model(precision, model)
        row = PrecisionRow(precision, result.ppl, result.nll, result.seconds, load_seconds, foot.bytes,
                           foot.params, foot.bits_per_param, foot.linear_bits_per_param, kl=result.kl,
                           top1=result.top1, ram_bytes=None if foot.ram_bytes == foot.bytes else foot.ram_bytes)
        ref_row = report.row(ref_name) if ref_name else None
        if ref_row is not None:
            row.reference, row.delta = ref_name, result.ppl - ref_row.ppl
            row.delta_rel = row.delta / ref_row.ppl
        report.rows.append(row)
        if progress:
            print(f"{precision:>7s}: {result.summary()}", flush=True)
        if precision in refs_needed.values():
            loaded[precision] = model
        del model
        later = set(refs_needed[p] for p in order[i + 1:])
        for name in [n for n in loaded if n not in later]:
            del loaded[name]
        gc.collect()
    return report


