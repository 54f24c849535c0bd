"""qopt: Meta's OPT language models in low-bit precision on small hardware.

The public API is re-exported here lazily (PEP 562): `import qopt` is cheap, and each name imports its stage of
the pipeline on first use, so `import qopt.model` never loads bitsandbytes.
"""
from __future__ import annotations

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module of the pipeline that defines it (bottom to top: model, quant, place, loading, generation,
# finetuning, calibration, evaluation)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AdapterError", "CheckpointError", "ConfigError", "GenerationError", "NumericsError",
                     "PlanError", "QoptError", "TokenizerError"), "errors"),
    **dict.fromkeys(("DownloadError", "HubAccessError", "HubError", "HubOfflineError"), "errors"),
    "resolve_model": "io.hub", "download_plan": "place.download_plan",
    "OPTConfig": "model.config", "KVCache": "model.cache", "OPTTokenizer": "model.tokenizer",
    **dict.fromkeys(("OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"),
                    "model.network"),
    **dict.fromkeys(("check_finite", "find_nonfinite"), "model.numerics"),
    "QuantizationConfig": "quant.config",
    **dict.fromkeys(("dequantize_weight", "quantize_model"), "quant.modules"),
    **dict.fromkeys(("MemoryPlan", "plan"), "place.plan"),
    **dict.fromkeys(("load", "quantize_checkpoint"), "loading.loader"),
    **dict.fromkeys(("GenerationConfig", "generate", "generate_text"), "generation.decoding"),
    "generate_many": "generation.throughput",
    **dict.fromkeys(("TextIteratorStreamer", "TextStreamer", "stream_generate"), "generation.streamers"),
    **dict.fromkeys(("LoraConfig", "add_lora", "delete_adapter", "disable_adapters", "set_adapter", "unload"),
                    "finetuning.lora"),
    **dict.fromkeys(("FinetunePlan", "plan_finetune"), "finetuning.plan"),
    **dict.fromkeys(("load_adapter", "save_adapter"), "finetuning.adapters"),
    **dict.fromkeys(("TrainingArguments", "train"), "finetuning.trainer"),
    **dict.fromkeys(("finetune", "prepare_for_kbit_training"), "finetuning.recipe"),
    **dict.fromkeys(("CalibrationConfig", "CalibrationReport", "calibrate", "calibrate_checkpoint",
                     "calibration_windows"), "calibration.layerwise"),
    **dict.fromkeys(("choose_precision", "layer_sensitivity", "plan_for_checkpoint"), "calibration.sensitivity"),
    **dict.fromkeys(("PerplexityResult", "evaluate_perplexity"), "evaluation.perplexity"),
    "ComparisonReport": "evaluation.report", "weight_footprint": "evaluation.footprint",
    "compare_precisions": "evaluation.compare",
    # the merge itself is finetuning.merge's; merge_and_unload lives with the measuring code (measure=True)
    **dict.fromkeys(("MergeQuality", "MergeResult", "merge_adapter", "merge_and_unload"), "evaluation.merge_quality"),
}
__all__ = sorted(_EXPORTS)


class _DropBitsandbytesNoise(_logging.Filter):
    """bitsandbytes logs a failed hub lookup at import (then uses its bundled kernel) and a dtype-cast notice on
    every int8 matmul; neither is actionable for a user. Only bitsandbytes' own loggers are filtered: the
    user's root logger is left alone."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return "kernels-community" not in message and not message.startswith("MatMul8bitLt: inputs will be cast")


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    _logging.getLogger(_name).addFilter(_DropBitsandbytesNoise())


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what static tools see; at run time the names arrive through __getattr__
    from .calibration.layerwise import (
        CalibrationConfig,
        CalibrationReport,
        calibrate,
        calibrate_checkpoint,
        calibration_windows,
    )
    from .calibration.sensitivity import choose_precision, layer_sensitivity, plan_for_checkpoint
    from .errors import (
        AdapterError,
        CheckpointError,
        ConfigError,
        DownloadError,
        GenerationError,
        HubAccessError,
        HubError,
        HubOfflineError,
        NumericsError,
        PlanError,
        QoptError,
        TokenizerError,
    )
    from .evaluation.compare import compare_precisions
    from .evaluation.footprint import weight_footprint
    from .evaluation.merge_quality import MergeQuality, MergeResult, merge_adapter, merge_and_unload
    from .evaluation.perplexity import PerplexityResult, evaluate_perplexity
    from .evaluation.report import ComparisonReport
    from .finetuning.adapters import load_adapter, save_adapter
    from .finetuning.lora import LoraConfig, add_lora, delete_adapter, disable_adapters, set_adapter, unload
    from .finetuning.plan import FinetunePlan, plan_finetune
    from .finetuning.recipe import finetune, prepare_for_kbit_training
    from .finetuning.trainer import TrainingArguments, train
    from .generation.decoding import GenerationConfig, generate, generate_text
    from .generation.streamers import TextIteratorStreamer, TextStreamer, stream_generate
    from .generation.throughput import generate_many
    from .io.hub import resolve_model
    from .loading.loader import load, quantize_checkpoint
    from .model.cache import KVCache
    from .model.config import OPTConfig
    from .model.network import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel
    from .model.numerics import check_finite, find_nonfinite
    from .model.tokenizer import OPTTokenizer
    from .place.download_plan import download_plan
    from .place.plan import MemoryPlan, plan
    from .quant.config import QuantizationConfig
    from .quant.modules import dequantize_weight, quantize_model
