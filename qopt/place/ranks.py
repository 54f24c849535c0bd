"""Several processes (torchrun, accelerate launch): each rank trains or runs a whole copy of the model, so a
device map that spreads one model over several devices cannot be used there.

A map like "auto" would give every rank the same plan over all GPUs: each process would fill every GPU with
its own copy's layers, and data parallelism would wrap a model that lives on several devices. Refused with
one line that names the map each rank should use instead.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import PlanError
from .strategies import STRATEGIES


def world_size() -> int:
    """Processes in this job: an initialized torch.distributed group, else WORLD_SIZE (set by torchrun and
    accelerate launch before any group exists), else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def spans_devices(device_map: Any) -> bool:
    """A strategy name, or a dict placing modules on more than one device (disk counts as one)."""
    if isinstance(device_map, str):
        return device_map in STRATEGIES
    if isinstance(device_map, dict):
        return len({str(d) for d in device_map.values()}) > 1
    return False


def check_one_device_per_rank(device_map: Any) -> None:
    """Refuse a spreading device map when world size > 1 (see the module docstring)."""
    size = world_size()
    if size > 1 and spans_devices(device_map):
        shown = f"{device_map!r}" if isinstance(device_map, str) else "a map over several devices"
        rank = local_rank()
        raise PlanError(f"device_map={shown} spreads one model over several devices, but this is one of {size} "
                        f"processes (torch.distributed), each holding a whole copy: give each rank one device, "
                        f"device_map={{'': {rank}}} (the local rank; --device-map cuda:{rank}), or cpu")
