"""Fine-tuning: QLoRA lowers eval loss, exact resume after a stop or a kill, torchrun, classification, data files."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qopt
from qopt.bundled import bundled_model_dir
from qopt.finetuning.adapters import ADAPTER_WEIGHTS, load_adapter
from qopt.finetuning.data import classification_dataset, lm_dataset, read_records
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.finetuning.recipe import finetune, prepare_for_kbit_training
from qopt.finetuning.trainer import TRAINING_LOG, TrainingArguments, lr_factor, make_optimizer
from qopt.model.tokenizer import tokenizer_for
from tests.conftest import save_random_opt

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = (bundled_model_dir() / "config.json").exists()
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
THINGS = ["apples", "books", "coins", "stones", "maps"]


def story(lines: int, seed: int = 0) -> str:
    """A small text with structure a model can pick up in a few hundred steps."""
    rng = random.Random(seed)
    return "\n".join(f"{rng.choice(NAMES)} gave {rng.choice(NAMES)} {rng.randint(2, 9)} {rng.choice(THINGS)} "
                     f"on day {rng.randint(1, 30)}." for _ in range(lines))


@pytest.fixture
def tiny_base(tmp_path):
    """A random OPT with the real vocabulary (so text files tokenize), hidden 64; its embedding is scaled up so
    the tied head can express a peaked distribution that the adapters can learn to move."""
    return save_random_opt(tmp_path / "tiny-opt", peaky=10)


def args(out, **overrides):
    base = dict(output_dir=str(out), max_steps=8, batch_size=2, gradient_accumulation_steps=2,
                learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=2, optimizer="adamw8bit",
                save_steps=4, eval_steps=3, seed=0, progress=False)
    return TrainingArguments(**{**base, **overrides})


@pytest.mark.parametrize("source", [pytest.param("bundled" if BUNDLED else "tiny",
                                                 marks=[pytest.mark.slow] if BUNDLED else [])])
def test_qlora_lowers_eval_loss_on_a_4bit_model(tmp_path, tiny_base, source):
    model = bundled_model_dir() if source == "bundled" else tiny_base
    (tmp_path / "story.txt").write_text(story(600))
    result = finetune(model, tmp_path / "story.txt", args(tmp_path / "out", max_steps=200, batch_size=4,
                                                          gradient_accumulation_steps=1, eval_steps=100,
                                                          save_steps=0, lr_scheduler="linear", warmup_steps=10),
                      LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), quantization="nf4",
                      block_size=32)
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 200
    assert last["loss"] < first["loss"] - 1.0, result.evals  # measurably better (nats per token)
    assert result.trainable_parameters < 0.02 * result.total_parameters
    assert result.peak_rss_bytes > 0 and result.tokens_per_second > 0
    log = json.loads((tmp_path / "out" / TRAINING_LOG).read_text())
    assert log["evals"] == result.evals and len(log["losses"]) == 200
    # the saved adapter reproduces the trained model's eval loss when loaded onto a fresh 4-bit base
    fresh = qopt.load(model, quantization="nf4")
    load_adapter(fresh, tmp_path / "out")
    blocks = lm_dataset(tmp_path / "story.txt", tokenizer_for(model), 32).split(0.1)[1].blocks.long()
    with torch.no_grad():
        loss = fresh(blocks, labels=blocks).loss.item()
    assert loss == pytest.approx(last["loss"], rel=0.02)


class Stop(Exception):
    pass


def stop_at(last_step):
    def on_step(step, loss):
        if step == last_step:
            raise Stop
    return on_step


def test_resume_after_a_stop_repeats_the_uninterrupted_losses_exactly(tmp_path, tiny_base):
    """nf4 base, LoRA dropout, 8-bit AdamW, gradient accumulation, warmup + cosine, an eval between checkpoint
    and stop: everything that could make a resumed run drift."""
    (tmp_path / "story.txt").write_text(story(200))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")

    def run(out, **kwargs):
        return finetune(tiny_base, tmp_path / "story.txt", args(out), lora, quantization="nf4", block_size=32,
                        **kwargs)

    full = run(tmp_path / "full")
    with pytest.raises(Stop):
        run(tmp_path / "cut", on_step=stop_at(6))
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last complete checkpoint; steps 5-6 were lost with the "process"
    resumed = run(tmp_path / "cut")
    assert resumed.resumed_from == 4
    assert len(full.losses) == 8 and resumed.losses == full.losses  # exactly equal floats
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in full.evals]
    a, b = load_file(tmp_path / "full" / ADAPTER_WEIGHTS), load_file(tmp_path / "cut" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sequence_classification_trains_a_saved_head_from_jsonl(tmp_path, tiny_base):
    rng = random.Random(1)
    rows = [{"text": f"{rng.choice(NAMES)} said the {rng.choice(THINGS)} were {word}",
             "label": "positive" if word in ("great", "lovely") else "negative"}
            for word in rng.choices(["great", "lovely", "awful", "dreadful"], k=160)]
    (tmp_path / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = finetune(tiny_base, tmp_path / "reviews.jsonl",
                      args(tmp_path / "out", max_steps=40, batch_size=8, gradient_accumulation_steps=1,
                           learning_rate=1e-2, eval_steps=0, save_steps=0, optimizer="adamw"),
                      LoraConfig(r=4, lora_alpha=8), task="seq-cls", eval_fraction=0.2, block_size=32)
    first, last = result.evals[0], result.evals[-1]
    assert last["loss"] < first["loss"] and last["accuracy"] >= 0.9, result.evals
    weights = load_file(tmp_path / "out" / ADAPTER_WEIGHTS)
    assert weights["base_model.model.score.weight"].shape == (2, 64)
    fresh = qopt.OPTForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    load_adapter(fresh, tmp_path / "out")
    eval_rows = classification_dataset(tmp_path / "reviews.jsonl", tokenizer_for(tiny_base), 256).split(0.2)[1]
    batch = eval_rows.collate([eval_rows[i] for i in range(len(eval_rows))])
    with torch.no_grad():
        accuracy = (fresh(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(last["accuracy"])


def test_prepare_for_kbit_training_freezes_casts_and_checkpoints(tiny_base):
    model = qopt.load(tiny_base, quantization="nf4", torch_dtype=torch.bfloat16)
    prepare_for_kbit_training(model)
    floats = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
    assert floats and all(p.dtype == torch.float32 for _, p in floats)  # norms, embedding/head, biases
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_decoder().gradient_checkpointing
    ids = torch.randint(3, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert model.get_input_embeddings()(ids).requires_grad  # so recomputed layers get gradients
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, init_lora_weights=False))
    model.train()

    def lora_grads():
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return grads

    with_checkpointing = lora_grads()
    model.gradient_checkpointing_disable()
    without = lora_grads()
    assert with_checkpointing.keys() == without.keys() and len(without) == 8
    assert all(torch.allclose(with_checkpointing[n], without[n], atol=1e-6) for n in without)


def test_schedules_warm_up_then_decay():
    linear = TrainingArguments("x", max_steps=10, warmup_steps=2, lr_scheduler="linear")
    assert [lr_factor(s, linear) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    cosine = TrainingArguments("x", max_steps=10, warmup_steps=2, lr_scheduler="cosine")
    assert lr_factor(6, cosine) == pytest.approx(0.5) and lr_factor(10, cosine) == pytest.approx(0.0)
    assert lr_factor(9, TrainingArguments("x", max_steps=10, lr_scheduler="constant")) == 1.0
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        TrainingArguments("x", optimizer="sgd")


def test_paged_optimizer_falls_back_to_unpaged_on_cpu():
    import bitsandbytes as bnb

    param = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.warns(UserWarning, match="using AdamW8bit on CPU"):
        optimizer = make_optimizer([param], TrainingArguments("x", optimizer="paged_adamw8bit"), on_gpu=False)
    assert type(optimizer) is bnb.optim.AdamW8bit
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert not torch.equal(param, before)


def test_data_files_pack_documents_and_name_bad_lines(tmp_path):
    tokenizer = tokenizer_for(tmp_path)  # no tokenizer files there: the bundled one
    (tmp_path / "docs.jsonl").write_text('{"text": "one two"}\n\n{"text": "three"}\n')
    blocks = lm_dataset(tmp_path / "docs.jsonl", tokenizer, 2).blocks.flatten().tolist()
    expected = tokenizer.encode("one two") + tokenizer.encode("three")  # each document starts with </s>
    assert blocks == expected[:len(blocks)] and blocks[0] == 2 and len(blocks) == len(expected) // 2 * 2
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"nolabel.jsonl:1: field 'label' is missing"):
        classification_dataset(tmp_path / "nolabel.jsonl", tokenizer, 16)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one block of 64"):
        lm_dataset(tmp_path / "short.txt", tokenizer, 64)


def cli(*arguments):
    return [sys.executable, "-m", "qopt.cli", "finetune", *map(str, arguments)]


def finetune_command(base, data, out, steps):
    return cli(base, "--data", data, "--output", out, "--quantization", "nf4", "--steps", steps, "--save-steps", 3,
               "--eval-steps", 5, "--block-size", 32, "--batch-size", 2, "--dropout", 0.1, "--target-modules",
               "all-linear", "--optimizer", "adamw8bit", "--lr", 3e-3, "--no-progress")


def quiet_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_killed_cli_run_resumes_from_its_last_checkpoint(tmp_path, tiny_base):
    (tmp_path / "story.txt").write_text(story(300))
    data = tmp_path / "story.txt"
    subprocess.run(finetune_command(tiny_base, data, tmp_path / "full", 30), check=True, env=quiet_env(),
                   capture_output=True)
    proc = subprocess.Popen(finetune_command(tiny_base, data, tmp_path / "cut", 30), env=quiet_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["step"] >= 6:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / TRAINING_LOG).exists(), "the run finished before it could be killed"
    killed_at = json.loads(state_file.read_text())["step"]
    done = subprocess.run(finetune_command(tiny_base, data, tmp_path / "cut", 30), env=quiet_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full = json.loads((tmp_path / "full" / TRAINING_LOG).read_text())
    cut = json.loads((tmp_path / "cut" / TRAINING_LOG).read_text())
    assert cut["resumed_from"] == killed_at and 6 <= killed_at < 30
    assert cut["losses"] == full["losses"] and len(full["losses"]) == 30
    assert "adapter written to" in done.stdout


def test_torchrun_two_cpu_processes_train_and_save_one_adapter(tmp_path, tiny_base):
    (tmp_path / "story.txt").write_text(story(300))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "qopt.cli", "finetune", str(tiny_base), "--data", str(tmp_path / "story.txt"), "--output",
               str(tmp_path / "out"), "--quantization", "nf4", "--steps", "6", "--save-steps", "3",
               "--block-size", "32", "--batch-size", "2", "--lr", "3e-3", "--no-progress"]
    done = subprocess.run(command, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adapter written to") == 1  # one process reports and writes
    log = json.loads((tmp_path / "out" / TRAINING_LOG).read_text())
    assert log["processes"] == 2 and len(log["losses"]) == 6
    assert len(torch.load(tmp_path / "out" / "checkpoint" / "rng_state.pt", weights_only=False)) == 2
    assert not list(tmp_path.glob(".out*")) and not list((tmp_path / "out").glob(".checkpoint*"))  # no leftovers
    fresh = qopt.load(tiny_base, quantization="nf4")
    load_adapter(fresh, tmp_path / "out")
    assert any(p.abs().sum() > 0 for n, p in fresh.named_parameters() if "lora_B" in n)


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_base, capsys):
    from qopt.cli import main

    code = main(["finetune", str(tiny_base), "--data", str(tmp_path / "missing.txt"), "--output",
                 str(tmp_path / "out")])
    assert code == 2 and "qopt finetune: error:" in capsys.readouterr().err
    (tmp_path / "story.txt").write_text(story(50))
    code = main(["finetune", str(tiny_base), "--data", str(tmp_path / "story.txt"), "--output",
                 str(tmp_path / "out"), "--block-size", "128"])
    assert code == 2 and "exceeds the model's max_position_embeddings (64)" in capsys.readouterr().err
    code = main(["finetune", str(tiny_base), "--data", str(tmp_path / "story.txt"), "--output",
                 str(tmp_path / "out"), "--target-modules", "query_key_value", "--block-size", "32"])
    assert code == 2 and "match no Linear module" in capsys.readouterr().err


def test_resume_refuses_a_different_data_order(tmp_path, tiny_base):
    (tmp_path / "story.txt").write_text(story(100))
    lora = LoraConfig(r=4)
    finetune(tiny_base, tmp_path / "story.txt", args(tmp_path / "out", max_steps=2, save_steps=2), lora,
             block_size=32)
    with pytest.raises(ValueError, match="batch_size=2, this run has 4"):
        finetune(tiny_base, tmp_path / "story.txt", args(tmp_path / "out", max_steps=4, batch_size=4), lora,
                 block_size=32)
    longer = finetune(tiny_base, tmp_path / "story.txt", args(tmp_path / "out", max_steps=4), lora, block_size=32)
    assert longer.resumed_from == 2 and len(longer.losses) == 4  # a finished run can be extended
