"""Commands that write never destroy their input or an existing model, fail before any work on a bad output
path, and write files with the process umask's modes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qopt
from qopt.bundled import bundled_model_dir, data_dir
from qopt.calibration.layerwise import calibrate_checkpoint
from qopt.cli import main
from qopt.errors import OutputError
from qopt.finetuning.adapters import save_adapter
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.io.checkpoint import write_safetensors_shards
from qopt.loading.loader import quantize_checkpoint
from tests.conftest import save_random_opt

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (names included), to prove no byte changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path):
    return save_random_opt(tmp_path / "float-model", vocab_size=1000, dropout=0.1)


@pytest.fixture
def no_work(monkeypatch):
    """Any load or save fails the test: a refusal must come before the work starts."""
    def work(*_args, **_kwargs):
        raise AssertionError("work started before the output was checked")

    for target in ("qopt.loading.loader.load", "qopt.loading.loader.save_model",
                   "qopt.calibration.layerwise.save_model", "qopt.calibration.layerwise.calibrate"):
        monkeypatch.setattr(target, work)


def refused(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qopt quantize: error: ") and err.count("\n") == 1, err
    return err


def test_quantize_onto_or_into_its_source_is_refused_in_every_spelling(tmp_path, source, no_work, capsys):
    before = tree_digest(source)
    (tmp_path / "link").symlink_to(source)
    spellings = {source: "is the input", tmp_path / "link": "is the input",
                 source / "sub" / "..": "is the input", source / "nf4": "is inside the input",
                 tmp_path / "link" / "nf4": "is inside the input", tmp_path: "contains the input"}
    for out, relation in spellings.items():
        for force in ([], ["--force"]):
            assert relation in refused(capsys, "quantize", source, "--out", out, *force)
        for method in (["--method", "calibrated"], ["--budget", "1GB"]):
            assert relation in refused(capsys, "quantize", source, "--out", out, *method)
    with pytest.raises(OutputError, match="is the input"):
        quantize_checkpoint(source, source, "nf4", overwrite=True)
    with pytest.raises(OutputError, match="is inside the input"):
        calibrate_checkpoint(tmp_path / "link", source / "calibrated")
    assert tree_digest(source) == before and not (source / "nf4").exists()


def test_bundled_model_cannot_be_overwritten_by_qopt_quantize(tmp_path, source, no_work, capsys):
    bundled = bundled_model_dir()
    before = tree_digest(bundled)
    assert "model.safetensors" in before
    assert "is the input" in refused(capsys, "quantize", "--out", bundled)  # the default MODEL is the bundled one
    assert "is the input" in refused(capsys, "quantize", "--out", bundled, "--force", "--bits", "8")
    # another source with --force still never writes over qopt's shipped files
    for out in (bundled, data_dir(), bundled / "sub", data_dir() / "tokenizer"):
        assert "qopt's shipped data" in refused(capsys, "quantize", source, "--out", out, "--force")
    assert tree_digest(bundled) == before


def test_bundled_model_survives_the_real_command(tmp_path):
    """The unpatched `qopt quantize --out <bundled>` in a subprocess; restored from a copy if it ever writes."""
    bundled = bundled_model_dir()
    backup = tmp_path / "backup"
    shutil.copytree(bundled, backup)
    before = tree_digest(bundled)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "qopt", "quantize", "--out", str(bundled), "--force"],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 2 and "is the input" in done.stderr, done.stderr
        assert tree_digest(bundled) == before
    finally:
        if tree_digest(bundled) != before:
            shutil.rmtree(bundled, ignore_errors=True)
            shutil.copytree(backup, bundled)


def test_out_over_an_existing_model_needs_force(tmp_path, source, capsys):
    out = tmp_path / "quantized"
    assert main(["quantize", str(source), "--out", str(out), "--bits", "8"]) == 0
    capsys.readouterr()
    first = tree_digest(out)
    err = refused(capsys, "quantize", source, "--out", out)
    assert str(out) in err and "--force" in err and "overwrite=True" not in err
    assert tree_digest(out) == first
    with pytest.raises(OutputError, match=r"already holds a model \(config.json\); pass overwrite=True"):
        quantize_checkpoint(source, out, "nf4")
    assert tree_digest(out) == first
    assert main(["quantize", str(source), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert not list(tmp_path.glob(".quantized*"))  # replaced atomically, nothing left beside it


def test_impossible_out_path_is_one_line_before_any_work(tmp_path, source, no_work, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert "a-file is a file, so no folder can be made under it" in \
        refused(capsys, "quantize", source, "--out", tmp_path / "a-file" / "out")
    assert "a-file is a file, expected a folder" in refused(capsys, "quantize", source, "--out", tmp_path / "a-file")
    # /proc refuses new entries to every user, root included (a chmod test would pass for root)
    assert "cannot write in /proc" in refused(capsys, "quantize", source, "--out", "/proc/qopt-out/nf4")
    assert "is too long for" in refused(capsys, "quantize", source, "--out", tmp_path / ("n" * 250))
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_umask_modes_not_0600(tmp_path, source, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "nf4"
        quantize_checkpoint(source, out, "nf4")
        model = qopt.load(source, progress=False)
        add_lora(model, LoraConfig(r=2))
        save_adapter(model, tmp_path / "adapter")
        write_safetensors_shards({f"t{i}": torch.zeros(256) for i in range(3)}, tmp_path, max_shard_size=1024)
    finally:
        os.umask(old)
    files = [*out.iterdir(), *(tmp_path / "adapter").iterdir(), *tmp_path.glob("model-*.safetensors")]
    assert any(f.name == "model.safetensors" for f in files) and len(list(tmp_path.glob("model-*"))) == 3
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct((out).stat().st_mode & 0o777) == oct(0o777 & ~umask)
