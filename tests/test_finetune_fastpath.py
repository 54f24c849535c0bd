"""The faster QLoRA step (`fast_path`: the tied head in bf16 and the fused loss, on by default in qopt.finetune)
trains like PEFT's all-fp32 recipe: the same losses within bf16 noise."""
import json

import pytest
import torch

import qopt
from qopt.finetuning.data import LMBlocks
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.finetuning.recipe import prepare_for_kbit_training
from qopt.finetuning.resume import CHECKPOINT_DIR, TRAINER_STATE
from qopt.finetuning.step_speedups import fast_path, half_precision_head
from qopt.finetuning.trainer import TrainingArguments, train
from tests.conftest import save_random_opt


def tiny_checkpoint(folder, vocab=1000):
    return save_random_opt(folder, peaky=10, dtype=torch.bfloat16, vocab_size=vocab, ffn_dim=256)


def losses(folder, out, half):
    torch.manual_seed(0)
    model = qopt.load(folder, quantization="nf4", torch_dtype=None, progress=False)
    prepare_for_kbit_training(model)
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if half:
        assert fast_path(model) == ("half_head", "fused_loss")
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = (torch.arange(32)[None, :] * 7 + torch.arange(64)[:, None] * 3) % 900 + 20
    args = TrainingArguments(str(out), max_steps=20, batch_size=4, learning_rate=5e-3, progress=False)
    return model, train(model, LMBlocks(ids), None, args).losses


def test_losses_over_20_steps_match_the_all_fp32_recipe(tmp_path):
    folder = tiny_checkpoint(tmp_path / "tiny")
    _, plain = losses(folder, tmp_path / "plain", half=False)
    model, fast = losses(folder, tmp_path / "fast", half=True)
    assert plain[-1] < plain[0] - 0.5  # both runs learn
    worst = max(abs(a - b) / abs(a) for a, b in zip(plain, fast, strict=True))
    assert worst < 5e-3, (worst, plain, fast)  # bf16 logits: 8 bits of mantissa, about 0.4% per value
    # the residual stream stays fp32: only the head's input is cast down
    hidden = model.model.decoder(input_ids=torch.arange(10)[None] + 20).last_hidden_state
    assert hidden.dtype == torch.float32


def test_nothing_changes_without_a_16_bit_compute_dtype_or_a_tied_frozen_head(tmp_path):
    folder = tiny_checkpoint(tmp_path / "tiny")
    float_model = qopt.load(folder, torch_dtype=None, progress=False)
    prepare_for_kbit_training(float_model)
    assert not half_precision_head(float_model)  # no 4-bit compute dtype to follow
    assert float_model.get_input_embeddings().weight.dtype == torch.float32
    fp32 = qopt.QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = qopt.load(folder, quantization=fp32, torch_dtype=None, progress=False)
    prepare_for_kbit_training(model)
    assert not half_precision_head(model)


def test_qopt_finetune_takes_the_fast_path_by_default(tmp_path):
    folder = tiny_checkpoint(tmp_path / "tiny", vocab=50272)
    data = tmp_path / "train.txt"
    data.write_text("The cat sat on the mat and looked at the door.\n" * 60)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, batch_size=2, progress=False)
    result = qopt.finetune(folder, data, args, quantization="nf4", block_size=32)
    state = json.loads((tmp_path / "out" / CHECKPOINT_DIR / TRAINER_STATE).read_text())
    assert state["fingerprint"]["training"]["half_head"] is True
    # auto checkpointing: a tiny model's activations fit in what the fp32 logits of PEFT's recipe would take
    assert result.recomputed_layers == "0 of 2" and "(0 of 2 layers recomputed)" in result.summary()


def test_the_command_line_spells_the_checkpointing_choices():
    from qopt.cli.common import checkpointing
    from qopt.cli.main import build_parser

    parse = lambda *flags: checkpointing(build_parser().parse_args(["finetune", "--data", "x.txt", "-o", "out", *flags]))  # noqa
    assert parse() == "auto" and parse("--gradient-checkpointing", "on") is True
    assert parse("--gradient-checkpointing", "off") is False and parse("--no-gradient-checkpointing") is False
    with pytest.raises(ValueError, match="gradient_checkpointing: expected True, False or 'auto'"):
        qopt.finetune("unused", "unused.txt", TrainingArguments("unused-out"), gradient_checkpointing="sometimes")
