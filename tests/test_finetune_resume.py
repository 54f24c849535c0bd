"""Honest fine-tune resume: a fingerprint of data, LoRA, settings and base decides whether a checkpoint is the
same run; a resume says where it continues, a finished run is not redone, a bad output folder fails first."""
import json
import shutil

import pytest
from test_training import story

import qopt
from qopt.cli import main
from qopt.errors import OutputError, ResumeError
from qopt.finetuning.data import lm_dataset
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.finetuning.recipe import finetune
from qopt.finetuning.resume import TRAINER_STATE, TrainerState
from qopt.finetuning.trainer import TRAINING_LOG, TrainingArguments, train
from qopt.model.tokenizer import tokenizer_for
from tests.conftest import save_random_opt

LORA = LoraConfig(r=4, lora_alpha=8)


@pytest.fixture
def tiny_base(tmp_path):
    """A random OPT with the real vocabulary (so text files tokenize), as in test_training.py."""
    return save_random_opt(tmp_path / "tiny-opt")


def quick(out, **overrides):
    base = {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3, "optimizer": "adamw", "save_steps": 0, "eval_steps": 0, "seed": 0, "progress": False}
    return TrainingArguments(**{**base, **overrides})


def run(base, data, out, lora=LORA, **kwargs):
    training = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainingArguments.__dataclass_fields__}
    return finetune(base, data, quick(out, **training), lora, block_size=32, eval_fraction=0, **kwargs)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(story(80))
    return path


@pytest.fixture
def no_load(monkeypatch):
    def load(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qopt.finetuning.recipe.load", load)


def test_resume_says_where_it_continues_and_a_finished_run_is_not_redone(tmp_path, tiny_base, data, capsys,
                                                                        monkeypatch):
    out = tmp_path / "out"
    first = run(tiny_base, data, out)
    assert first.resumed_from is None and not first.already_done
    assert "resuming" not in capsys.readouterr().out
    longer = run(tiny_base, data, out, max_steps=4)
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert longer.resumed_from == 2 and longer.steps == 4 and not longer.already_done
    log = (out / TRAINING_LOG).read_bytes()
    adapter = (out / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr("qopt.finetuning.recipe.load", lambda *a, **k: pytest.fail("the model was loaded"))
    done = run(tiny_base, data, out, max_steps=4)
    assert done.already_done and done.steps == 4 and done.losses == longer.losses
    assert done.summary().startswith("already done (step 4 of 4)") and "tokens/s" not in done.summary()
    assert (out / TRAINING_LOG).read_bytes() == log and (out / "adapter_model.safetensors").read_bytes() == adapter


def test_a_final_save_cut_short_is_finished_without_training(tmp_path, tiny_base, data):
    """Killed after the last checkpoint, before the adapter and log: the re-run writes them and trains nothing."""
    out = tmp_path / "out"
    first = run(tiny_base, data, out)
    (out / TRAINING_LOG).unlink()
    (out / "adapter_model.safetensors").unlink()
    again = run(tiny_base, data, out)
    assert again.already_done and again.resumed_from == 2 and again.losses == first.losses
    assert (out / "adapter_model.safetensors").exists() and json.loads((out / TRAINING_LOG).read_text())["steps"] == 2


@pytest.fixture
def finished(tmp_path, tiny_base, data):
    out = tmp_path / "out"
    run(tiny_base, data, out)
    return out


@pytest.mark.parametrize("change, message", [
    ({"lora": LoraConfig(r=8, lora_alpha=8)}, r"lora r 4 -> 8"),
    ({"learning_rate": 1e-3}, r"learning_rate 0.003 -> 0.001"),
    ({"quantization": "nf4"}, r"quantization none -> nf4"),
    ({"block": 16}, r"block_size 32 -> 16"),
    ({"seed": 1}, r"seed=0, this run has 1"),  # the data-order check every checkpoint age gets
])
def test_changed_settings_are_named(tmp_path, tiny_base, data, finished, no_load, change, message):
    change = dict(change)
    block = change.pop("block", 32)
    lora = change.pop("lora", LORA)
    training = {k: change.pop(k) for k in list(change) if k in TrainingArguments.__dataclass_fields__}
    with pytest.raises(ResumeError, match=message) as err:
        finetune(tiny_base, data, quick(finished, max_steps=4, **training), lora, block_size=block,
                 eval_fraction=0, **change)
    assert "resume=False" in str(err.value) and str(finished / "checkpoint") in str(err.value)


def test_changed_data_and_base_model_are_named(tmp_path, tiny_base, data, finished, no_load):
    data.write_text(story(80, seed=1))
    with pytest.raises(ResumeError, match=r"data file train.txt changed \(sha256 [0-9a-f]{12}\.\.\. -> "):
        run(tiny_base, data, finished, max_steps=4)
    data.write_text(story(80))
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    with pytest.raises(ResumeError, match="base model tiny-opt -> other-base"):
        run(other, data, finished, max_steps=4)
    moved = tmp_path / "moved" / "tiny-opt"
    shutil.copytree(tiny_base, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "dropout": 0.3}))
    with pytest.raises(ResumeError, match="base model config dropout 0.0 -> 0.3"):
        run(moved, data, finished, max_steps=4)


def test_the_same_run_moved_or_renamed_resumes(tmp_path, tiny_base, data, finished, capsys):
    moved = tmp_path / "moved" / "tiny-opt"
    shutil.copytree(tiny_base, moved)
    renamed = tmp_path / "copy.txt"
    shutil.copy(data, renamed)
    result = run(moved, renamed, finished, max_steps=3)
    assert result.resumed_from == 2 and "resuming from step 2 of 3" in capsys.readouterr().out


def test_resume_false_starts_over(tmp_path, tiny_base, data, finished):
    result = run(tiny_base, data, finished, lora=LoraConfig(r=8, lora_alpha=8), resume=False)
    assert result.resumed_from is None and not result.already_done and result.steps == 2


def test_cli_names_its_flags_and_says_already_done(tmp_path, tiny_base, data, capsys):
    out = tmp_path / "out"
    command = ["finetune", str(tiny_base), "--data", str(data), "--output", str(out), "--r", "4", "--steps", "2",
               "--block-size", "32", "--batch-size", "2", "--eval-fraction", "0", "--no-progress"]
    assert main(command) == 0
    capsys.readouterr()
    assert main([*command, "--r", "8"]) == 2  # the last --r wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora r 4 -> 8" in err and "--no-resume" in err and "resume=False" not in err
    assert main(command) == 0
    said = capsys.readouterr().out
    assert "already done (step 2 of 2)" in said and "tokens/s" not in said and "adapter in" in said
    assert main([*command, "--r", "8", "--no-resume"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_a_checkpoint_without_fingerprint_still_resumes_and_says_so(tmp_path, tiny_base, data, finished, capsys):
    state_file = finished / "checkpoint" / TRAINER_STATE
    state = json.loads(state_file.read_text())
    assert set(state["fingerprint"]) == {"base", "data", "lora", "training"}
    del state["fingerprint"]
    state_file.write_text(json.dumps(state))
    result = run(tiny_base, data, finished, max_steps=3, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2))
    said = capsys.readouterr().out
    assert result.resumed_from == 2 and "resuming from step 2 of 3 (the checkpoint has no fingerprint" in said
    assert "fingerprint" in json.loads(state_file.read_text())  # written at the next save


# trainer_state.json as qopt wrote it before `TrainerState` (train() dumped a free-form dict), fp16 run
OLD_FP16_STATE = """{
 "step": 2,
 "epoch": 1,
 "batches_in_epoch": 0,
 "losses": [
  10.8125,
  10.75
 ],
 "evals": [
  {
   "step": 0,
   "loss": 10.9,
   "perplexity": 54176.2
  }
 ],
 "args": {
  "output_dir": "out",
  "max_steps": 2,
  "batch_size": 2,
  "gradient_accumulation_steps": 1,
  "seed": 0,
  "fp16": true
 },
 "fingerprint": {
  "base": {},
  "data": {},
  "lora": {},
  "training": {}
 },
 "skipped_steps": 1,
 "grad_scaler": {
  "scale": 32768.0,
  "growth_factor": 2.0,
  "backoff_factor": 0.5,
  "growth_interval": 2000,
  "_growth_tracker": 1
 }
}
"""


def test_trainer_state_reads_the_old_format_and_writes_it_byte_for_byte():
    state = TrainerState.from_json(OLD_FP16_STATE)
    assert (state.step, state.epoch, state.skipped_steps, state.grad_scaler["scale"]) == (2, 1, 1, 32768.0)
    assert state.to_json() == OLD_FP16_STATE
    plain = json.loads(OLD_FP16_STATE)  # no loss scaling, written before fingerprints: neither kind of key
    for key in ("skipped_steps", "grad_scaler", "fingerprint"):
        del plain[key]
    text = json.dumps(plain, indent=1) + "\n"
    state = TrainerState.from_json(text)
    assert state.fingerprint is None and state.grad_scaler is None and state.to_json() == text
    with pytest.raises(ResumeError, match=r"x.json: not a qopt trainer state \(expected an object with 'step'"):
        TrainerState.from_json('{"losses": []}', "x.json")
    with pytest.raises(ResumeError, match="x.json: not JSON"):
        TrainerState.from_json("{", "x.json")


def test_a_state_file_written_as_a_plain_dict_resumes(tmp_path, tiny_base, data, finished, capsys):
    """The old train() wrote `json.dumps(state_dict, indent=1)`; such a file resumes, and the next save writes
    the same keys in the same order."""
    state_file = finished / "checkpoint" / TRAINER_STATE
    old = json.loads(state_file.read_text())
    assert list(old) == ["step", "epoch", "batches_in_epoch", "losses", "evals", "args", "fingerprint"]
    state_file.write_text(json.dumps(old, indent=1) + "\n")
    result = run(tiny_base, data, finished, max_steps=3)
    assert result.resumed_from == 2 and result.losses[:2] == old["losses"] and len(result.losses) == 3
    assert "resuming from step 2 of 3" in capsys.readouterr().out
    new_text = state_file.read_text()
    assert list(json.loads(new_text)) == list(old) and new_text == json.dumps(json.loads(new_text), indent=1) + "\n"


def test_output_folder_is_checked_before_any_work(tmp_path, tiny_base, data, no_load, monkeypatch):
    monkeypatch.setattr("qopt.finetuning.recipe.lm_dataset", lambda *a, **k: pytest.fail("data was read"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="a-file is a file, so no folder can be made under it"):
        run(tiny_base, data, tmp_path / "a-file" / "out")
    before = {p.name: p.read_bytes() for p in tiny_base.iterdir()}
    with pytest.raises(OutputError, match="is the input"):
        run(tiny_base, data, tiny_base)
    with pytest.raises(OutputError, match="contains the input"):
        run(tiny_base, data, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    with pytest.raises(OutputError, match=r"holds a model \(config.json\)"):
        run(tiny_base, data, other)
    assert {p.name: p.read_bytes() for p in tiny_base.iterdir()} == before


def test_train_without_the_recipe_fingerprints_from_the_model(tmp_path, tiny_base):
    tokens = lm_dataset_for(tiny_base, tmp_path)
    model = qopt.load(tiny_base, progress=False)
    add_lora(model, LoraConfig(r=4))
    train(model, tokens, None, quick(tmp_path / "out"))
    model = qopt.load(tiny_base, progress=False)
    add_lora(model, LoraConfig(r=8))
    with pytest.raises(ResumeError, match="lora r 4 -> 8"):
        train(model, tokens, None, quick(tmp_path / "out", max_steps=3))
    with pytest.raises(OutputError, match="holds a model"):  # train() checks its output folder too
        train(model, tokens, None, quick(tiny_base))


def lm_dataset_for(base, folder):
    (folder / "t.txt").write_text(story(40))
    return lm_dataset(folder / "t.txt", tokenizer_for(base), 32)
