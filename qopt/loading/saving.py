"""Model-aware saving: the state dict as HF and bitsandbytes lay it out, written as a crash-safe folder."""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.atomic import publish_folder, staging_folder
from ..io.checkpoint import write_safetensors_shards
from ..place.offload import iter_offloaded_modules, offloaded_tensors


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as HF writes it: tied lm_head left out, quantized modules in the standard bitsandbytes
    layout (the same bytes before and after a CPU repack, see `qopt.quantization.Linear4bit`), layers offloaded
    to disk read back from their offload folder, plain tensors (no Params4bit / Int8Params subclasses)."""
    offloaded = offloaded_tensors(model)
    prefixes = tuple(name + "." for name in iter_offloaded_modules(model))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if prefixes and name.startswith(prefixes):
            prefix = next(p for p in prefixes if name.startswith(p))
            state.update({k: offloaded[k] for k in offloaded if k.startswith(prefix) and k not in state})
            continue
        if tensor.device.type == "meta":
            raise CheckpointError(f"cannot save: tensor '{name}' was never loaded (it is on the meta device)")
        state[name] = tensor.as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        del state["lm_head.weight"]
    return state


def save_model(model: Any, folder: str | os.PathLike, max_shard_size: str | int = "2GB",
               extra_files: Sequence[Path] = ()) -> None:
    """config.json and safetensors shards (plus `extra_files`, e.g. tokenizer files) into `folder`, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(folder)
    try:
        state = model_state_for_saving(model)
        config = model.config
        config.torch_dtype = str(model.dtype).removeprefix("torch.") if model.dtype.is_floating_point else None
        config.extra["architectures"] = [type(model).__name__]
        config.save_pretrained(tmp)
        write_safetensors_shards(state, tmp, max_shard_size)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, if any, is untouched
        raise
    publish_folder(tmp, folder)
