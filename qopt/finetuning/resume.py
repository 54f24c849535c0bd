"""A training checkpoint: what a run saves so that a resumed run continues with the same losses.

The checkpoint folder holds the adapter, the optimizer and scheduler states, every process's RNG state and
`trainer_state.json` (a `TrainerState`: step, data position, history, the arguments and the run's fingerprint).
It is written to a sibling staging folder and swapped in, so a kill at any moment leaves the previous complete
checkpoint.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..errors import ResumeError
from ..io.atomic import atomic_write_text, publish_folder, staging_folder
from .adapters import adapter_state_dict, load_adapter_state_dict, read_adapter_weights, write_adapter_files
from .fingerprint import differences
from .lora import adapter_set

if TYPE_CHECKING:
    from .trainer import TrainingArguments

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """The JSON part of a checkpoint. Files of every qopt version read back: one written before fingerprints has
    none (None here, and it gets one at its next save), one without fp16 loss scaling has no scaler keys."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    batches_in_epoch: int = 0  # this process's batches of the epoch already consumed
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # the TrainingArguments, as asdict wrote them
    fingerprint: dict[str, Any] | None = None
    skipped_steps: int = 0  # fp16: updates the loss scaler skipped
    grad_scaler: dict[str, Any] | None = None  # fp16: the loss scaler's state

    def to_json(self) -> str:
        """The file's text; the fields of features a run did not use are left out, as they always were."""
        data = asdict(self)
        if self.fingerprint is None:
            del data["fingerprint"]
        if self.grad_scaler is None:
            del data["skipped_steps"], data["grad_scaler"]
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | Path = TRAINER_STATE) -> TrainerState:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ResumeError(f"{source}: not JSON ({error}); start over ({ResumeError.PLACEHOLDER})",
                              "resume=False") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("step"), int) or "args" not in data:
            raise ResumeError(f"{source}: not a qopt trainer state (expected an object with 'step' and 'args'); "
                              f"start over ({ResumeError.PLACEHOLDER})", "resume=False")
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def read(cls, file: Path) -> TrainerState:
        return cls.from_json(file.read_text(), file)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])


def save_checkpoint(folder: Path, accelerator: Accelerator, model: nn.Module, optimizer: Any,
                    scheduler: Any, state: TrainerState) -> None:
    """Everything a run needs to continue exactly; written by the main process, swapped in whole."""
    rng_states = gather_object([_rng_state()])  # one per process, in process order
    if accelerator.is_main_process:
        adapters = adapter_set(model)
        tmp = staging_folder(folder)
        write_adapter_files(tmp, adapters.configs[adapters.active], adapter_state_dict(model))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_state.pt")
        atomic_write_text(tmp / TRAINER_STATE, state.to_json())
        publish_folder(tmp, folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, accelerator: Accelerator, model: nn.Module, optimizer: Any,
                    scheduler: Any) -> tuple[TrainerState, dict[str, Any] | None]:
    """Restore adapter, optimizer and scheduler; returns the trainer state and this process's RNG state."""
    state = TrainerState.read(folder / TRAINER_STATE)
    weights, file = read_adapter_weights(folder)
    load_adapter_state_dict(model, adapter_set(model).active, weights, str(file))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_states = torch.load(folder / "rng_state.pt", weights_only=False)  # our own file: python / numpy tuples
    if len(rng_states) != accelerator.num_processes:
        logger.warning("%s: saved by %d processes, resuming with %d: RNG streams restart from the seed",
                       folder, len(rng_states), accelerator.num_processes)
        return state, None
    return state, rng_states[accelerator.process_index]


def _check_same_data_order(saved: dict[str, Any], args: TrainingArguments, folder: Path) -> None:
    """The saved data position only means the same batches under the same seed and batch shape (checked on
    checkpoints of every age: their saved arguments predate fingerprints)."""
    for name in ("seed", "batch_size", "gradient_accumulation_steps"):
        if saved.get(name) != getattr(args, name):
            raise ResumeError(f"{folder}: the checkpoint was written with {name}={saved.get(name)}, this run has "
                              f"{getattr(args, name)}; resume with the same value or start over "
                              f"({ResumeError.PLACEHOLDER})", "resume=False")


def check_resume(output: Path, fingerprint: dict[str, Any], args: TrainingArguments) -> TrainerState | None:
    """The saved trainer state this run continues (None: no checkpoint, or resume=False); a ResumeError that
    says what changed when the checkpoint belongs to another run (see `qopt.finetuning.fingerprint`)."""
    file = output / CHECKPOINT_DIR / TRAINER_STATE
    if not args.resume or not file.exists():
        return None
    saved = TrainerState.read(file)
    _check_same_data_order(saved.args, args, file.parent)
    changes = differences(saved.fingerprint, fingerprint) if saved.fingerprint is not None else []
    if changes:
        raise ResumeError(f"{file.parent}: a different run: {'; '.join(changes)}; rerun with the same data and "
                          f"settings, choose another output folder, or start over ({ResumeError.PLACEHOLDER})",
                          "resume=False")
    return saved
