"""`load()`: a checkpoint folder streamed into a model built on the meta device, one shard at a time."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm

from .checkpoint import inspect_checkpoint, iter_shard_tensors, normalize_key
from .config import OPTConfig
from .errors import CheckpointError
from .model import OPTForCausalLM, OPTModel, OPTPreTrainedModel

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_HEAD_PREFIXES = ("score.", "qa_outputs.")  # task heads a causal-LM checkpoint does not have


def resolve_dtype(torch_dtype: str | torch.dtype | None, config: OPTConfig) -> torch.dtype:
    """None means float32 (as in HF); "auto" means the dtype config.json names."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return _DTYPES.get(config.torch_dtype or "float32", torch.float32)
    if torch_dtype not in _DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r}: expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[torch_dtype]


def load(path: str | os.PathLike, *, model_class: type[OPTPreTrainedModel] = OPTForCausalLM,
         torch_dtype: str | torch.dtype | None = None, progress: bool = True, **config_overrides: Any
         ) -> OPTPreTrainedModel:
    """Load a local HF OPT checkpoint folder; the full-precision model is never built twice in memory."""
    path = Path(path)
    config = OPTConfig.from_pretrained(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.validate(str(path / "config.json"))
    files = inspect_checkpoint(path)
    dtype = resolve_dtype(torch_dtype, config)
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    expected = dict(model.named_parameters())
    has_prefix = not isinstance(model, OPTModel)
    loaded: set[str] = set()
    bar = tqdm(files.shards, desc="Loading shards", unit="shard", disable=not progress or len(files.shards) < 2)
    for shard in bar:
        for raw_name, tensor in iter_shard_tensors(files, shard):
            name = normalize_key(raw_name, has_prefix)
            param = expected.get(name)
            if param is None:
                continue  # e.g. lm_head.weight when loading a task head, or HF bookkeeping buffers
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{shard}: tensor '{raw_name}' has shape {list(tensor.shape)}, "
                                      f"config.json implies {list(param.shape)}")
            if not tensor.dtype.is_floating_point:
                raise CheckpointError(f"{shard}: tensor '{raw_name}' has dtype {tensor.dtype}, expected a float")
            set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=dtype)
            loaded.add(name)
    _finish_missing(model, expected, loaded, path, dtype)
    model.tie_weights()
    return model.eval()


def _finish_missing(model: OPTPreTrainedModel, expected: dict[str, torch.nn.Parameter], loaded: set[str],
                    path: Path, dtype: torch.dtype) -> None:
    """Initialise new task heads like HF does; any other missing tensor is an error."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - loaded - tied)
    fatal = [n for n in missing if not n.startswith(_HEAD_PREFIXES)]
    if fatal:
        more = f" and {len(fatal) - 5} more" if len(fatal) > 5 else ""
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {', '.join(fatal[:5])}{more}")
    if missing:
        logger.warning("%s: newly initialised (not in the checkpoint): %s", path, ", ".join(missing))
    generator = torch.Generator().manual_seed(0)
    for name in missing:
        shape = expected[name].shape
        value = torch.zeros(shape) if name.endswith("bias") else \
            torch.randn(shape, generator=generator) * model.config.init_std
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=dtype)
