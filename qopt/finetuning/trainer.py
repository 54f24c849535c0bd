"""The LoRA / QLoRA fine-tuning loop on `accelerate.Accelerator`: checkpoints, exact resume, evaluation.

The same code runs as one process, under `torchrun` or under `accelerate launch`: the Accelerator wraps the model
for data parallelism and shards the batches; nothing here knows how many processes there are beyond logging.
A checkpoint (adapter, optimizer, scheduler, step, data position and every process's RNG state) is written to a
sibling staging folder and swapped in, so a kill at any moment leaves the previous complete checkpoint, and a
resumed run continues with the same losses an uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import AdapterError
from ..io.atomic import atomic_write_text
from ..io.outputs import check_output_folder
from ..quant.modules import bits_of
from ..utils import format_bytes
from .adapters import save_adapter
from .fingerprint import base_fingerprint, run_fingerprint
from .lora import adapter_set, trainable_parameters
from .resume import CHECKPOINT_DIR, TrainerState, check_resume, load_checkpoint, save_checkpoint, set_rng_state

logger = logging.getLogger(__name__)
TRAINING_LOG = "training_log.json"
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainingArguments:
    """Steps count optimizer updates; one update sees batch_size x gradient_accumulation_steps x processes rows."""

    output_dir: str
    max_steps: int = 100
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_steps: int = 0  # 0: a checkpoint only at the end
    eval_steps: int = 0  # 0: evaluate only at the end
    eval_batches: int | None = None  # cap on evaluation batches (None: the whole eval set)
    seed: int = 0
    bf16: bool = False  # autocast the forward to bfloat16 (adapters and optimizer stay fp32)
    fp16: bool = False  # autocast to float16 with loss scaling (GPUs without bfloat16, e.g. T4)
    resume: bool = True  # continue from output_dir/checkpoint when one is there
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r}: expected one of {SCHEDULES}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive: choose one 16-bit autocast dtype")


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean training loss of every optimizer step, resumed history included
    evals: list[dict[str, float]]
    trainable_parameters: int
    total_parameters: int
    tokens_per_second: float
    seconds: float
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    resumed_from: int | None
    output_dir: str
    processes: int = 1
    is_main_process: bool = True  # under torchrun every process returns a result; one of them reports
    already_done: bool = False  # the output folder held a finished run: nothing was trained
    skipped_steps: int = 0  # fp16: updates the loss scaler skipped for inf / NaN gradients
    recomputed_layers: str = ""  # gradient checkpointing: "k of n" decoder layers recomputed in backward

    def summary(self) -> str:
        last = self.evals[-1] if self.evals else {}
        if self.already_done:
            return f"already done (step {self.steps} of {self.steps}), final loss {self.losses[-1]:.4f}"
        evals = ", ".join(f"eval {k} {v:.4g}" for k, v in last.items() if k != "step")
        cuda = f", CUDA max allocated {format_bytes(self.cuda_peak_bytes)}" if self.cuda_peak_bytes else ""
        if self.skipped_steps:
            cuda += f"; {self.skipped_steps} updates skipped by the fp16 loss scaler (inf / NaN gradients)"
        return (f"{self.steps} steps, final loss {self.losses[-1]:.4f}{', ' + evals if evals else ''}; "
                f"trainable {self.trainable_parameters:,} of {self.total_parameters:,} parameters "
                f"({100 * self.trainable_parameters / max(1, self.total_parameters):.2f}%); "
                f"{self.tokens_per_second:,.0f} tokens/s"
                f"{f' ({self.recomputed_layers} layers recomputed)' if self.recomputed_layers else ''}; "
                f"peak RSS {format_bytes(self.peak_rss_bytes)}{cuda}")


# -- model preparation --------------------------------------------------------------------------------------
def make_optimizer(params: list[nn.Parameter], args: TrainingArguments, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW in fp32, or bitsandbytes' 8-bit AdamW; paged memory needs CUDA, so CPU falls back to unpaged."""
    kwargs = dict(lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)

    if args.optimizer == "paged_adamw8bit":
        if on_gpu:
            return bnb.optim.PagedAdamW8bit(params, **kwargs)
        warnings.warn("paged_adamw8bit: paged optimizer memory needs CUDA; using AdamW8bit on CPU", stacklevel=2)
    return bnb.optim.AdamW8bit(params, **kwargs)


def lr_factor(step: int, args: TrainingArguments) -> float:
    """Linear warmup to the peak, then linear or cosine decay to zero at max_steps (transformers' shapes)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    if args.lr_scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


# -- evaluation ---------------------------------------------------------------------------------------------
@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """eval() for dropout, but 4-bit layers keep their training layout.

    bitsandbytes repacks a Linear4bit for its CPU kernel at the first eval-mode forward and stores the absmax in
    bf16 then, which would change the base weights training sees after the first evaluation.
    """
    was_training = model.training
    model.eval()
    for module in model.modules():
        if bits_of(module) == 4:
            module.training = True
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, bf16: bool = False,
             max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss and perplexity (causal LM), or mean loss and accuracy (classification)."""
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, weight, correct, rows
    with evaluation_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with _autocast(accelerator, bf16):
                out = model(**batch)
            if out.logits is not None and out.logits.dim() == 2:  # classification (a fused LM loss has none)
                rows = batch["labels"].shape[0]
                totals += torch.tensor([out.loss.item() * rows, rows,
                                        (out.logits.argmax(-1) == batch["labels"]).sum().item(), rows],
                                       dtype=torch.float64, device=totals.device)
            else:
                tokens = _predicted_tokens(batch)
                totals += torch.tensor([out.loss.item() * tokens, tokens, 0, 0], dtype=torch.float64,
                                       device=totals.device)
    totals = accelerator.reduce(totals, "sum")
    loss = (totals[0] / totals[1].clamp_min(1)).item()
    if totals[3] > 0:
        return {"loss": loss, "accuracy": (totals[2] / totals[3]).item()}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that have a next-token target (the loss averages over these)."""
    mask = batch.get("attention_mask")
    labels = batch["labels"] if mask is None else batch["labels"].masked_fill(mask == 0, -100)
    return int((labels[:, 1:] != -100).sum())


def _autocast(accelerator: Accelerator, bf16: bool | torch.dtype | None) -> Any:
    """True (bf16) or a 16-bit dtype: autocast the forward to it; False / None: no autocast."""
    dtype = torch.bfloat16 if bf16 is True else bf16 or None
    return torch.autocast(accelerator.device.type, dtype=dtype) if dtype else nullcontext()


def autocast_dtype(args: TrainingArguments) -> torch.dtype | None:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def make_grad_scaler(args: TrainingArguments, device_type: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16: float16 gradients underflow to zero below 6e-8, so the loss is multiplied up
    before backward and the gradients divided back before the update; a step whose gradients hold inf / NaN is
    skipped and the scale halved. Disabled (a pass-through) otherwise. torch's own scaler rather than
    accelerate's, which sets none up on a CPU."""
    return torch.amp.GradScaler(device_type, enabled=args.fp16)


# -- data order ---------------------------------------------------------------------------------------------
def _epoch_loader(dataset: Dataset, args: TrainingArguments, epoch: int, accelerator: Accelerator) -> DataLoader:
    """A fixed shuffled order per (seed, epoch), from its own generator: the global RNG only drives dropout,
    and a resumed run finds the same batches by skipping the ones already seen."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
    return accelerator.prepare_data_loader(_loader(dataset, args.batch_size, order.tolist(), drop_last=True))


def _loader(dataset: Dataset, batch_size: int, order: list[int] | None = None, drop_last: bool = False
            ) -> DataLoader:
    """A DataLoader with a generator of its own: without one, every new iterator draws a seed from the global
    RNG, so evaluating or resuming would shift the dropout masks of the steps after it."""
    return DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=drop_last,
                      collate_fn=getattr(dataset, "collate", None), generator=torch.Generator().manual_seed(0))


# -- checkpoints --------------------------------------------------------------------------------------------
def finished_run(output: Path, fingerprint: dict[str, Any], args: TrainingArguments,
                 is_main_process: bool = True) -> TrainResult | None:
    """The logged result when `output` holds this run finished (max_steps reached), so nothing is redone."""
    saved = check_resume(output, fingerprint, args)
    log = output / TRAINING_LOG
    if saved is None or saved.step < args.max_steps or not log.exists():
        return None
    data = json.loads(log.read_text())
    if data.get("steps") != saved.step:  # the log of an earlier, shorter run: the final save was cut short
        return None
    result = TrainResult(**{f.name: data[f.name] for f in fields(TrainResult) if f.name in data})
    logger.info("%s: already done (step %d of %d)", output, result.steps, result.steps)
    return replace(result, already_done=True, is_main_process=is_main_process)


def _recomputed(model: nn.Module) -> str:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not getattr(decoder, "gradient_checkpointing", False):
        return ""
    return f"{decoder.checkpointed_layers} of {len(decoder.layers)}"


def model_fingerprint(model: nn.Module, args: TrainingArguments) -> dict[str, Any]:
    """A run's fingerprint from the model alone (base, adapter, settings): `train` called without a recipe."""
    adapters = adapter_set(model)
    base = base_fingerprint(getattr(model, "name_or_path", None), model.config.to_dict())
    return run_fingerprint(base, adapters.configs[adapters.active], args)


# -- the loop -----------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One call of `train`: what it set up, and the counters its steps advance."""

    args: TrainingArguments
    model: nn.Module
    wrapped: nn.Module  # the model as the Accelerator wrapped it (the one that runs forward)
    accelerator: Accelerator
    params: list[nn.Parameter]
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    state: TrainerState
    eval_loader: DataLoader | None
    bar: Any
    resumed_from: int | None
    trainable: int
    total: int
    on_step: Callable[[int, float], None] | None
    micro: int = 0  # micro-batches seen by this call
    step_loss: float = 0.0  # this update's loss so far (mean over its micro-batches)
    tokens: int = 0
    start: float = 0.0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.args.output_dir) / CHECKPOINT_DIR


def _start_or_resume(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, args: TrainingArguments,
                     on_step: Callable[[int, float], None] | None, fingerprint: dict[str, Any] | None
                     ) -> _Run | TrainResult:
    """Set up the optimizer, scheduler, loss scaler and data, then restore the checkpoint this run continues;
    a finished run's logged result instead when output_dir holds one."""
    check_output_folder(args.output_dir, adapter=True)  # before any training: a bad folder fails now
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed, device_specific=True)
    output = Path(args.output_dir)
    trainable, total = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, accelerator.device.type == "cuda")
    # The scheduler is stepped here once per update rather than prepared: accelerate's wrapper would step it
    # once per process, changing the schedule with the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None
    if eval_set is not None:
        eval_loader = accelerator.prepare_data_loader(_loader(eval_set, args.batch_size))
    if len(train_set) < args.batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_set)} training examples are fewer than one batch of {args.batch_size} "
                         f"per process ({accelerator.num_processes} processes)")

    fingerprint = fingerprint or model_fingerprint(model, args)
    state = TrainerState(args=asdict(args), fingerprint=fingerprint)
    resumed_from, rng = None, None
    checkpoint_dir = output / CHECKPOINT_DIR
    if accelerator.is_main_process:  # staging folders a killed save left behind; the published copy is intact
        for stale in output.glob(f".{CHECKPOINT_DIR}.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
    saved = check_resume(output, fingerprint, args)
    if saved is not None:
        finished = finished_run(output, fingerprint, args, accelerator.is_main_process)
        if finished is not None:
            return finished
        state, rng = load_checkpoint(checkpoint_dir, accelerator, model, optimizer, scheduler)
        state.fingerprint = fingerprint  # a checkpoint from before fingerprints gets one at its next save
        resumed_from = state.step
        unchecked = "" if saved.fingerprint is not None else \
            " (the checkpoint has no fingerprint, written by an older qopt: its data and settings are not checked)"
        if accelerator.is_main_process:
            print(f"resuming from step {resumed_from} of {args.max_steps}{unchecked}", flush=True)
        logger.info("resuming from %s at step %d", checkpoint_dir, resumed_from)
    if rng is not None:
        set_rng_state(rng)
    scaler = make_grad_scaler(args, accelerator.device.type)
    if state.grad_scaler is not None:  # fp16: the loss scale a resumed run continues from
        scaler.load_state_dict(state.grad_scaler)

    bar = tqdm(total=args.max_steps, initial=state.step, desc="Fine-tuning", unit="step",
               disable=not (args.progress and accelerator.is_local_main_process))
    return _Run(args, model, wrapped, accelerator, params, optimizer, scheduler, scaler, state, eval_loader, bar,
                resumed_from, trainable, total, on_step)


def _run_eval(run: _Run) -> None:
    result = {"step": run.state.step, **evaluate(run.wrapped, run.eval_loader, run.accelerator,
                                                 autocast_dtype(run.args), run.args.eval_batches)}
    run.state.evals.append(result)
    if run.accelerator.is_main_process:
        run.bar.write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


def _step(run: _Run, batch: dict[str, torch.Tensor]) -> bool:
    """Forward and backward one micro-batch; on the last of an update, clip, step the optimizer and scheduler
    and record the update's loss. True when an update was made."""
    args, accelerator, state, scaler = run.args, run.accelerator, run.state, run.scaler
    accum = args.gradient_accumulation_steps
    run.micro += 1
    state.batches_in_epoch += 1
    syncing = run.micro % accum == 0
    with accelerator.no_sync(run.wrapped) if not syncing else nullcontext():
        with _autocast(accelerator, autocast_dtype(args)):
            loss = run.wrapped(**batch).loss
        accelerator.backward(scaler.scale(loss / accum))
    run.step_loss += loss.item() / accum
    run.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if not syncing:
        return False
    scaler.unscale_(run.optimizer)  # clipping sees true gradients
    if args.max_grad_norm:
        accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(run.optimizer)  # skipped when a gradient is inf / NaN
    scaler.update()
    if scaler.is_enabled():
        state.skipped_steps += scaler.get_scale() < scale
        state.grad_scaler = scaler.state_dict()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    mean_loss = accelerator.reduce(torch.tensor(run.step_loss, device=accelerator.device), "mean").item()
    state.step += 1
    state.losses.append(mean_loss)
    run.step_loss = 0.0
    return True


def _after_step(run: _Run) -> None:
    """Progress, then the evaluation, checkpoint and callback due at this step."""
    args, step, mean_loss = run.args, run.state.step, run.state.losses[-1]
    rate = run.tokens * run.accelerator.num_processes / max(time.perf_counter() - run.start, 1e-9)
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    if run.eval_loader is not None and (step == args.max_steps or args.eval_steps and step % args.eval_steps == 0):
        _run_eval(run)
    if step == args.max_steps or args.save_steps and step % args.save_steps == 0:
        save_checkpoint(run.checkpoint_dir, run.accelerator, run.model, run.optimizer, run.scheduler, run.state)
    if run.on_step is not None:
        run.on_step(step, mean_loss)


def _finish(run: _Run) -> TrainResult:
    """The result, with the adapter and the training log written to output_dir."""
    run.bar.close()
    accelerator, state, output = run.accelerator, run.state, Path(run.args.output_dir)
    seconds = time.perf_counter() - run.start
    result = TrainResult(
        steps=state.step, losses=state.losses, evals=state.evals, trainable_parameters=run.trainable,
        total_parameters=run.total, tokens_per_second=run.tokens * accelerator.num_processes / max(seconds, 1e-9),
        seconds=seconds, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        resumed_from=run.resumed_from, output_dir=str(output), processes=accelerator.num_processes,
        is_main_process=accelerator.is_main_process, recomputed_layers=_recomputed(run.model),
        already_done=run.resumed_from is not None and run.resumed_from >= run.args.max_steps,
        skipped_steps=state.skipped_steps)
    if accelerator.is_main_process:
        save_adapter(run.model, output)
        atomic_write_text(output / TRAINING_LOG, json.dumps(asdict(result), indent=1) + "\n")
    accelerator.wait_for_everyone()
    return result


def train(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, args: TrainingArguments,
          on_step: Callable[[int, float], None] | None = None, fingerprint: dict[str, Any] | None = None
          ) -> TrainResult:
    """Train the active LoRA adapter of `model`; the adapter is saved to output_dir in PEFT's format.

    A checkpoint in output_dir is resumed only under the same `fingerprint` (default: one made from the model
    and `args`; `qopt.finetune` adds the data files); a finished run returns its logged result untrained.
    """
    if adapter_set(model).active is None:
        raise AdapterError("no active adapter to train (add one with qopt.add_lora)")
    run = _start_or_resume(model, train_set, eval_set, args, on_step, fingerprint)
    if isinstance(run, TrainResult):
        return run
    if run.accelerator.is_main_process and args.progress:
        run.bar.write(f"trainable parameters: {run.trainable:,} of {run.total:,} "
                      f"({100 * run.trainable / max(1, run.total):.2f}%), "
                      f"{run.accelerator.num_processes} process(es) on {run.accelerator.device.type}")
    if run.eval_loader is not None and run.state.step == 0:
        _run_eval(run)  # the starting point, so the log shows what training changed
    run.start = time.perf_counter()
    run.wrapped.train()
    while run.state.step < args.max_steps:
        loader = _epoch_loader(train_set, args, run.state.epoch, run.accelerator)
        if run.state.batches_in_epoch:
            loader = run.accelerator.skip_first_batches(loader, run.state.batches_in_epoch)
        for batch in loader:
            if _step(run, batch):
                _after_step(run)
                if run.state.step >= args.max_steps:
                    break
        else:
            run.state.epoch += 1
            run.state.batches_in_epoch = 0
    return _finish(run)
