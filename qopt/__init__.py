"""qopt: Meta's OPT language models in low-bit precision on small hardware."""
import logging as _logging


class _DropBitsandbytesNoise(_logging.Filter):
    """bitsandbytes logs a failed hub lookup at import (then uses its bundled kernel) and a dtype-cast notice on
    every int8 matmul; neither is actionable for a user."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return "kernels-community" not in message and not message.startswith("MatMul8bitLt: inputs will be cast")


for _name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions", ""):
    _logging.getLogger(_name).addFilter(_DropBitsandbytesNoise())

from .cache import KVCache  # noqa: E402
from .config import OPTConfig  # noqa: E402
from .errors import (AdapterError, CheckpointError, ConfigError, GenerationError, NumericsError,  # noqa: E402
                     PlanError, QoptError, TokenizerError)
from .loading import load, quantize_checkpoint  # noqa: E402
from .model import (OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification,  # noqa: E402
                    OPTModel)
from .tokenizer import OPTTokenizer  # noqa: E402
from .numerics import check_finite, find_nonfinite  # noqa: E402
from .planning import MemoryPlan, plan  # noqa: E402
from .generation import GenerationConfig, generate, generate_text  # noqa: E402
from .streaming import TextIteratorStreamer, TextStreamer, stream_generate  # noqa: E402
from .quantization import QuantizationConfig, dequantize_weight, quantize_model  # noqa: E402
from .evaluation import PerplexityResult, evaluate_perplexity  # noqa: E402
from .report import ComparisonReport, compare_precisions, weight_footprint  # noqa: E402
from .calibration import (CalibrationConfig, CalibrationReport, calibrate, calibrate_checkpoint,  # noqa: E402
                          calibration_windows)
from .sensitivity import choose_precision, layer_sensitivity, plan_for_checkpoint  # noqa: E402
from .adapters import load_adapter, save_adapter  # noqa: E402
from .lora import (LoraConfig, add_lora, delete_adapter, disable_adapters, merge_and_unload,  # noqa: E402
                   set_adapter, unload)
from .training import TrainingArguments, finetune, prepare_for_kbit_training, train  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AdapterError", "CalibrationConfig", "CalibrationReport", "CheckpointError", "ComparisonReport",
           "ConfigError", "GenerationConfig", "GenerationError", "KVCache", "LoraConfig", "MemoryPlan",
           "NumericsError", "OPTConfig", "OPTForCausalLM", "OPTForQuestionAnswering",
           "OPTForSequenceClassification", "OPTModel", "OPTTokenizer", "PerplexityResult", "PlanError",
           "QoptError", "QuantizationConfig", "TextIteratorStreamer", "TextStreamer", "TokenizerError",
           "TrainingArguments", "add_lora", "calibrate", "calibrate_checkpoint", "calibration_windows",
           "check_finite", "choose_precision", "compare_precisions", "delete_adapter", "dequantize_weight",
           "disable_adapters", "evaluate_perplexity", "find_nonfinite", "finetune", "generate", "generate_text",
           "layer_sensitivity", "load", "load_adapter", "merge_and_unload", "plan", "plan_for_checkpoint",
           "prepare_for_kbit_training", "quantize_checkpoint", "quantize_model", "save_adapter", "set_adapter",
           "stream_generate", "train", "unload", "weight_footprint"]
