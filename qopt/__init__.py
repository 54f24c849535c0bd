"""qopt: Meta's OPT language models in low-bit precision on small hardware."""
import logging as _logging


class _DropKernelHubNotice(_logging.Filter):
    """bitsandbytes logs a failed hub lookup at import and then uses its bundled kernel; users need not see it."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


for _name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", ""):
    _logging.getLogger(_name).addFilter(_DropKernelHubNotice())

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
