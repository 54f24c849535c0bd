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
from .loading import load  # noqa: E402
from .model import (OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification,  # noqa: E402
                    OPTModel)
from .tokenizer import OPTTokenizer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AdapterError", "CheckpointError", "ConfigError", "GenerationError", "KVCache", "NumericsError",
           "OPTConfig", "OPTForCausalLM", "OPTForQuestionAnswering", "OPTForSequenceClassification", "OPTModel",
           "OPTTokenizer", "PlanError", "QoptError", "TokenizerError", "load"]
