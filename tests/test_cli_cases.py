"""What a new user hit next (the second round): adapters on a copied or moved base, eval memory of an offloaded
model, portable baselines, fp16 training on a CPU. Each test here failed before."""
import json
import logging
import shutil
from pathlib import Path

import pytest

import qopt
from qopt.bundled import bundled_model_dir
from qopt.cli import main
from qopt.errors import AdapterError

BUNDLED = str(bundled_model_dir())


def _copy(folder, to):
    shutil.copytree(folder, to)
    return str(to)


# -- adapters on a moved base ---------------------------------------------------------------------------------
def test_an_adapter_applies_to_a_copied_base_with_a_notice_and_the_same_output(adapter, tmp_path, capsys, caplog):
    moved = _copy(BUNDLED, tmp_path / "my-colab-copy")
    gen = ["generate", "Once upon a time", "--max-new-tokens", "6", "--bits", "16", "--adapter", str(adapter)]
    assert main(gen) == 0
    expected = capsys.readouterr().out
    with caplog.at_level(logging.WARNING):
        assert main([gen[0], moved, *gen[1:]]) == 0
    assert capsys.readouterr().out == expected
    notice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note: adapter")]
    assert len(notice) == 1 and BUNDLED in notice[0] and moved in notice[0]
    assert main(["eval", moved, "--windows", "1", "--bits", "16", "--adapter", str(adapter)]) == 0  # once a process
    keys = set(json.loads((adapter / "adapter_config.json").read_text()))
    assert not [k for k in keys if "qopt" in k]  # PEFT reads this file: nothing of ours in it


def test_an_adapter_for_another_shape_or_hub_model_is_refused_naming_the_difference(adapter, tmp_path, capsys):
    from conftest import save_random_opt

    other = save_random_opt(tmp_path / "narrow", hidden_size=32, ffn_dim=64)
    model = qopt.load(other, progress=False)
    with pytest.raises(AdapterError, match=r"differs: model.decoder.layers.0.self_attn.q_proj takes 256 inputs in "
                                           r"the adapter's base, 32 in this model"):
        qopt.load_adapter(model, adapter)
    snapshot = tmp_path / "models--org--opt-a" / "snapshots" / ("a" * 40)
    _copy(BUNDLED, snapshot)
    hub_adapter = _copy(adapter, tmp_path / "hub-adapter")
    config = json.loads((Path(hub_adapter) / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/opt-b"
    (Path(hub_adapter) / "adapter_config.json").write_text(json.dumps(config))
    gen = ["generate", str(snapshot), "Hi", "--max-new-tokens", "1", "--adapter", hub_adapter]
    assert main(gen) == 2
    err = capsys.readouterr().err
    assert "another Hub model (org/opt-b, this model is org/opt-a)" in err and "--ignore-base" in err
    assert "check_base" not in err
    assert main(gen + ["--ignore-base"]) == 0
    config["base_model_name_or_path"], config["revision"] = "org/opt-a", "b" * 40
    (Path(hub_adapter) / "adapter_config.json").write_text(json.dumps(config))
    assert main(gen) == 2 and "another revision of org/opt-a" in capsys.readouterr().err
    assert main(["merge", str(snapshot), hub_adapter, "-o", str(tmp_path / "merged"), "--windows", "1",
                 "--no-progress"]) == 2
    assert "--ignore-base" in capsys.readouterr().err
    assert main(["merge", str(snapshot), hub_adapter, "-o", str(tmp_path / "merged"), "--windows", "1",
                 "--no-progress", "--ignore-base"]) == 0


# -- eval memory ----------------------------------------------------------------------------------------------
def test_an_offloaded_model_reports_its_weights_wherever_they_are_and_its_ram_apart(tmp_path):
    full = qopt.weight_footprint(qopt.load(BUNDLED, quantization="nf4", progress=False))
    model = qopt.load(BUNDLED, quantization="nf4", progress=False)
    layer = qopt.weight_footprint(model.model.decoder.layers[0]).bytes
    cpu = full.bytes - len(model.model.decoder.layers) * layer + 2 * layer + layer // 2
    placement = {"device_map": "auto", "max_memory": {"cpu": cpu}, "offload_folder": str(tmp_path / "off")}
    offloaded = qopt.weight_footprint(qopt.load(BUNDLED, quantization="nf4", progress=False, **placement))
    # the disk layers count as stored there (bitsandbytes' layout); in RAM a 4-bit layer on a CPU also keeps its
    # original statistics beside the repacked ones, so the two agree within that, not to the byte (before, the
    # offloaded model reported only its RAM: 483.77 MB against 932.84 MB for NF4 1.3B)
    assert offloaded.params == full.params and offloaded.linear_params == full.linear_params
    assert abs(offloaded.bytes - full.bytes) < 0.01 * full.bytes
    assert abs(offloaded.linear_bits_per_param - full.linear_bits_per_param) < 0.25
    assert full.ram_bytes == full.bytes and offloaded.ram_bytes < 0.95 * full.bytes
    assert offloaded.where["disk"] + offloaded.ram_bytes == offloaded.bytes
    report = qopt.compare_precisions(BUNDLED, ["nf4"], max_windows=1, reference=False, progress=False,
                                     placement=placement)
    row = report.rows[0]  # measured after the evaluation: the layers in RAM in their CPU-repacked state
    in_memory = qopt.compare_precisions(BUNDLED, ["nf4"], max_windows=1, reference=False, progress=False).rows[0]
    assert row.ram_bytes is not None and row.ram_bytes < row.weight_bytes and in_memory.ram_bytes is None
    assert row.params == in_memory.params  # the offloaded layers' parameters counted too
    assert abs(row.weight_bytes - in_memory.weight_bytes) < 0.01 * in_memory.weight_bytes  # was 483 vs 932 MB
    # (4.55 against 4.76: the in-RAM layers keep their original statistics beside the repacked ones; was 2.59)
    assert abs(row.linear_bits_per_param - in_memory.linear_bits_per_param) < 0.25
    assert "MB of them in RAM" in report.to_markdown()


# -- portable baselines ---------------------------------------------------------------------------------------
def test_a_baseline_names_a_folder_relative_to_itself_and_checks_from_anywhere(tmp_path, monkeypatch, capsys):
    from conftest import save_random_opt

    from qopt.evaluation import gate

    work = tmp_path / "repo"
    save_random_opt(work / "models" / "tiny")
    monkeypatch.chdir(work)
    assert main(["eval", "models/tiny", "--bits", "32", "--windows", "1", "--seqlen", "32",
                 "--write-baseline", "evals/base.json"]) == 0
    assert json.loads((work / "evals" / "base.json").read_text())["model"] == "../models/tiny"
    clone = tmp_path / "clone"
    shutil.copytree(work, clone)
    shutil.rmtree(work)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--check", "clone/evals/base.json"]) == 0, capsys.readouterr().err
    # an older baseline naming its model as typed, or by absolute path, still resolves that way
    old = gate.read_baseline(clone / "evals" / "base.json")
    old.report.model = str(clone / "models" / "tiny")
    assert gate.baseline_model_path(old) == str(clone / "models" / "tiny")
    # a Hub model is stored as its repo id and commit
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("c" * 40)
    shutil.copytree(clone / "models" / "tiny", snapshot)
    assert gate._portable_model(str(snapshot), tmp_path / "b.json") == ("org/tiny", "c" * 40)
    assert gate._portable_model(BUNDLED, tmp_path / "b.json") == ("bundled", None)


def test_the_gate_baseline_still_names_the_bundled_model():
    from qopt.evaluation import gate

    baseline = gate.read_baseline(Path(__file__).resolve().parents[1] / "evals" / "baselines" / "gate.json")
    assert baseline.report.model == "bundled" and baseline.revision is None
    assert gate.baseline_model_path(baseline) == BUNDLED


# -- fp16 on a CPU --------------------------------------------------------------------------------------------
def test_fp16_training_on_a_cpu_warns_once_and_the_cpu_plan_says_so(tmp_path, caplog):
    from qopt.finetuning import recipe

    recipe._warned.clear()
    model = qopt.load(BUNDLED, progress=False)
    args = qopt.TrainingArguments(str(tmp_path / "out"), fp16=True)
    with caplog.at_level(logging.WARNING):
        recipe.warn_fp16_on_cpu(model, args)
        recipe.warn_fp16_on_cpu(model, args)
        recipe.warn_fp16_on_cpu(model, qopt.TrainingArguments(str(tmp_path / "out"), bf16=True))
    warnings = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert len(warnings) == 1 and "no fast float16 matmuls" in warnings[0] and "bf16" in warnings[0]
    plan = qopt.plan_finetune(BUNDLED, machine="cpu", host="8GiB").format()
    assert "not fp16: CPUs have no fast float16 matmuls" in plan
    assert "no fast float16" not in qopt.plan_finetune(BUNDLED, machine="colab-t4").format()
    from qopt.cli import finetune as command
    from qopt.cli.main import cli_words

    assert "--bf16" in cli_words(Exception(), recipe.FP16_ON_CPU, command.run)
    assert "fp16=True" not in cli_words(Exception(), recipe.FP16_ON_CPU, command.run)
