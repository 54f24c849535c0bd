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
from ..place.offload import offload_hooks


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as HF writes it: tied lm_head left out, quantized modules in the standard bitsandbytes
    layout (the same bytes before and after a CPU repack, see `qopt.quant.modules.Linear4bit`), layers offloaded
    to disk (or stored in host RAM) read back from where they live, plain tensors (no Params4bit / Int8Params)."""
    hooks = {name + ".": hook for name, hook in offload_hooks(model).items()}
    prefixes = tuple(hooks)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if prefixes and name.startswith(prefixes):
            hook = hooks[next(p for p in prefixes if name.startswith(p))]
            state.update({k: hook.weights[k] for k in hook.keys if k not in state})
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
