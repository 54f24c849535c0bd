"""fp16 training for GPUs without bfloat16 (T4): float16 autocast and compute, loss scaling with torch's
GradScaler, driven here on the CPU, where accelerate sets up no scaler of its own."""
import math

import pytest
import torch

import qopt
from qopt.finetuning.data import LMBlocks
from qopt.finetuning.lora import LoraConfig, add_lora, lora_layers
from qopt.finetuning.recipe import fp16_compute, prepare_for_kbit_training
from qopt.finetuning.trainer import TrainingArguments, train
from tests.conftest import save_random_opt


@pytest.fixture
def tiny_folder(tmp_path):
    return save_random_opt(tmp_path / "tiny", vocab_size=256)


def pattern_blocks(rows: int = 32, length: int = 32) -> LMBlocks:
    """A repeating sequence the adapter can learn: each row a shifted run of 0..15 (+10)."""
    ids = (torch.arange(length)[None, :] + torch.arange(rows)[:, None]) % 16 + 10
    return LMBlocks(ids)


def fp16_model(folder):
    model = qopt.load(folder, quantization=fp16_compute("nf4"), torch_dtype=None, progress=False)
    prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model


def test_fp16_training_lowers_the_loss_with_finite_values(tmp_path, tiny_folder):
    model = fp16_model(tiny_folder)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.compute_dtype == torch.float16 for m in quantized)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=30, batch_size=4, learning_rate=1e-2, fp16=True,
                             lr_scheduler="constant", progress=False)
    result = train(model, pattern_blocks(), None, args)
    assert all(math.isfinite(loss) for loss in result.losses), result.losses
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # 5.28 -> 4.38 here
    assert result.skipped_steps < 5  # a few at the start at most, while the scale comes down from 65536
    adapter = [p for _, layer in lora_layers(model) for p in layer.lora_B.parameters()]
    assert all(torch.isfinite(p).all() for p in adapter)


def test_the_loss_scaler_skips_a_step_whose_gradients_hold_inf(tmp_path, tiny_folder):
    model = fp16_model(tiny_folder)
    name, layer = next(iter(lora_layers(model)))
    watched = layer.lora_A["default"].weight
    calls = {"backward": 0}

    def poison(grad):  # the 8th backward (optimizer step 8) gets an inf in one gradient
        calls["backward"] += 1
        return grad.clone().fill_(float("inf")) if calls["backward"] == 8 else grad

    watched.register_hook(poison)
    snapshots = {}

    def on_step(step, loss):
        snapshots[step] = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])

    args = TrainingArguments(str(tmp_path / "out"), max_steps=12, batch_size=4, learning_rate=1e-2, fp16=True,
                             lr_scheduler="constant", progress=False)
    result = train(model, pattern_blocks(), None, args, on_step=on_step)
    assert torch.equal(snapshots[8], snapshots[7]), "the poisoned update was applied"
    assert not torch.equal(snapshots[9], snapshots[8])  # training continues after the skipped step
    assert result.skipped_steps == 1  # this one only: the tiny model's gradients never overflow on their own
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_bf16_and_fp16_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bf16 and fp16 are exclusive"):
        TrainingArguments(str(tmp_path), bf16=True, fp16=True)
