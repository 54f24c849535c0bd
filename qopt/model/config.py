"""`OPTConfig`: Hugging Face `config.json` in and out, validated field by field."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.atomic import atomic_write_text
from ..io.checkpoint import ADAPTER_CONFIG

CONFIG_NAME = "config.json"
_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "quick_gelu")
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
_MAX_SIZE = 2**31 - 1  # no sane OPT dimension comes near; bigger values are corrupt files
# Without these a config.json cannot say which network it describes; HF's defaults (OPT-125M) would build
# a model of the wrong shape, so a file that omits them is refused rather than completed.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
                   "max_position_embeddings")


@dataclass
class OPTConfig:
    """OPT hyper-parameters with the names and defaults of the HF docs (defaults = facebook/opt-125m)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    torch_dtype: str | None = None
    num_labels: int = 2
    problem_type: str | None = None
    quantization_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, source: str = "OPTConfig") -> None:
        """Reject values that would build a broken model, naming the field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
                    "num_attention_heads", "word_embed_proj_dim", "num_labels")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer (at most {_MAX_SIZE}), "
                                  f"got {value!r:.100}")
        for name in ("dropout", "attention_dropout", "layerdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{source}: field '{name}' must be a number in [0, 1], got {value!r:.100}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not 0.0 <= self.init_std < float("inf"):
            raise ConfigError(f"{source}: field 'init_std' must be a non-negative number, got {self.init_std!r:.100}")
        for name in ("do_layer_norm_before", "_remove_final_layer_norm", "enable_bias",
                     "layer_norm_elementwise_affine", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: field '{name}' must be true or false, got {getattr(self, name)!r:.100}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: field 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.activation_function not in _ACTIVATIONS:
            raise ConfigError(f"{source}: field 'activation_function' must be one of {_ACTIVATIONS}, "
                              f"got {self.activation_function!r:.100}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{source}: field '{name}' must be an id in [0, vocab_size={self.vocab_size}), "
                                  f"got {value!r:.100}")
        if self.torch_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"{source}: field 'torch_dtype' must be float32, float16 or bfloat16, "
                              f"got {self.torch_dtype!r:.100}")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"{source}: field 'problem_type' must be one of {_PROBLEM_TYPES[1:]} or null, "
                              f"got {self.problem_type!r:.100}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise ConfigError(f"{source}: field 'quantization_config' must be an object, "
                              f"got {self.quantization_config!r:.100}")

    # -- HF config.json -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> OPTConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"{source}: not an OPT model (model_type {model_type!s:.100}); field 'model_type' "
                              f"must be 'opt'")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "dtype" in data and "torch_dtype" not in data:  # transformers 5 renamed it
            kwargs["torch_dtype"] = data["dtype"]
        if "id2label" in data and "num_labels" not in data:
            if not isinstance(data["id2label"], dict) or not data["id2label"]:
                raise ConfigError(f"{source}: field 'id2label' must be a non-empty object, "
                                  f"got {data['id2label']!r:.100}")
            kwargs["num_labels"] = len(data["id2label"])
        extra = {k: v for k, v in data.items() if k not in known and k not in ("dtype", "model_type")}
        try:
            config = cls(**kwargs, extra=extra)
        except ConfigError as err:
            raise ConfigError(str(err).replace("OPTConfig", source, 1)) from None
        except TypeError as err:  # e.g. a string where a number belongs, caught in arithmetic
            raise ConfigError(f"{source}: {err}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data.pop("num_labels")
        if self.quantization_config is None:
            data.pop("quantization_config")
        if self.problem_type is None:
            data.pop("problem_type")
        data.update({k: v for k, v in extra.items() if k not in data})
        if self.num_labels != 2 or "id2label" in extra:
            data.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(self.num_labels)})
            data.setdefault("label2id", {f"LABEL_{i}": i for i in range(self.num_labels)})
        data["model_type"] = "opt"
        data.setdefault("architectures", ["OPTForCausalLM"])
        return dict(sorted(data.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OPTConfig:
        """Read `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.exists():
            raise ConfigError(_adapter_hint(path) or f"{file}: no config.json found; expected an OPT checkpoint folder")
        try:
            data = json.loads(file.read_bytes().decode("utf-8"))
        except OSError as err:
            raise ConfigError(f"{file}: cannot read ({err.strerror or err})") from None
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
        if isinstance(data, dict) and data.get("model_type", "opt") != "opt":  # before the fields it would lack
            return cls.from_dict(data, source=str(file))
        missing = [name for name in REQUIRED_FIELDS if isinstance(data, dict) and name not in data]
        if missing:
            raise ConfigError(f"{file}: field '{missing[0]}' is missing (an OPT config.json names "
                              f"{', '.join(REQUIRED_FIELDS)})")
        return cls.from_dict(data, source=str(file))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2) + "\n")


def _adapter_hint(folder: Path) -> str | None:
    """A LoRA adapter folder given where a model belongs: say so, and name its base model."""
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        return None
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path") or "its base model"
    except (OSError, ValueError, AttributeError):
        base = "its base model"
    return (f"{folder}: a LoRA adapter ({ADAPTER_CONFIG}), not a model; load the base model ({base}) and apply "
            f"the adapter: --adapter {folder} on the command line, qopt.load_adapter(model, ...) in Python")
