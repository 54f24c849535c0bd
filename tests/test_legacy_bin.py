"""A legacy (pre-zip) .bin cannot be memory-mapped: it is weighed against MemAvailable before torch.load reads it."""
import logging
import shutil

import pytest
import torch

import qopt
from qopt.errors import CheckpointError
from qopt.io import checkpoint
from qopt.io.checkpoint import load_state_dict
from qopt.utils import format_bytes
from tests.conftest import save_random_opt


def _bin_folder(tmp_path, legacy: bool = True):
    """(folder with pytorch_model.bin, the safetensors folder it was converted from)."""
    source = save_random_opt(tmp_path / "source")
    out = tmp_path / ("legacy" if legacy else "zip")
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    torch.save(load_state_dict(source), out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return out, source


def test_legacy_bin_over_memavailable_fails_in_one_line_naming_file_and_fix(tmp_path, monkeypatch):
    folder, _ = _bin_folder(tmp_path)
    size = (folder / "pytorch_model.bin").stat().st_size
    monkeypatch.setattr(checkpoint, "mem_available", lambda: size - 1)
    with pytest.raises(CheckpointError) as err:
        qopt.load(folder, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(folder / "pytorch_model.bin") in message and "legacy (non-zip)" in message
    assert "convert it to safetensors" in message and "zip .bin" in message


def test_legacy_bin_counts_the_weights_the_load_still_keeps_in_ram(tmp_path, monkeypatch):
    folder, _ = _bin_folder(tmp_path)
    size = (folder / "pytorch_model.bin").stat().st_size
    monkeypatch.setattr(checkpoint, "mem_available", lambda: size + 1000)  # room for the file, not the model too
    with pytest.raises(CheckpointError, match="of weights still to load into host RAM"):
        qopt.load(folder, progress=False)
    # a caller that keeps nothing in RAM (the default) only needs room for the file
    assert checkpoint.check_legacy_bin(folder / "pytorch_model.bin") is False


def test_legacy_bin_under_memavailable_warns_once_with_the_cost_and_loads(tmp_path, monkeypatch, caplog):
    folder, source = _bin_folder(tmp_path)
    size = (folder / "pytorch_model.bin").stat().st_size
    monkeypatch.setattr(checkpoint, "mem_available", lambda: 1 << 40)
    with caplog.at_level(logging.WARNING, logger="qopt.io.checkpoint"):
        model = qopt.load(folder, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "legacy" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert format_bytes(size) in warnings[0] and f"{format_bytes(1 << 40)} available" in warnings[0]
    reference = qopt.load(source, progress=False)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_zip_bin_is_mapped_without_consulting_memavailable(tmp_path, monkeypatch, caplog):
    folder, _ = _bin_folder(tmp_path, legacy=False)

    def refuse() -> int:
        raise AssertionError("MemAvailable read for a zip .bin")

    monkeypatch.setattr(checkpoint, "mem_available", refuse)
    with caplog.at_level(logging.WARNING, logger="qopt.io.checkpoint"):
        qopt.load(folder, progress=False)
    assert not [r for r in caplog.records if "legacy" in r.getMessage()]
    assert checkpoint.check_legacy_bin(folder / "pytorch_model.bin") is True


def test_mem_available_reads_proc_meminfo():
    available = checkpoint.mem_available()
    assert available is None or 0 < available < 1 << 50
