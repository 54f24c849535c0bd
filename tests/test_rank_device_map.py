"""Several processes (torchrun): a device map that spreads one model over devices is refused in one line."""
import pytest
import torch

import qopt
from qopt.cli.main import main
from qopt.finetuning.trainer import TrainingArguments
from qopt.place.ranks import check_one_device_per_rank, spans_devices, world_size


@pytest.fixture
def tiny(tmp_path):
    config = qopt.OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                            num_attention_heads=4, max_position_embeddings=64)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_size() == 2


def test_spreading_maps_are_refused_under_two_ranks(two_ranks, tiny):
    for device_map in ("auto", "balanced", "sequential", {"model.decoder": "cpu", "lm_head": 0}):
        with pytest.raises(qopt.PlanError, match=r"one of 2 processes .* device_map=\{'': 1\}"):
            qopt.load(tiny, device_map=device_map, progress=False)
    model = qopt.load(tiny, device_map="cpu", progress=False)  # one device per rank is what is asked for
    assert model.hf_device_map == {"": "cpu"}


def test_finetune_refuses_before_any_work(two_ranks, tiny, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("hello world\n" * 50)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, progress=False)
    with pytest.raises(qopt.PlanError, match="each holding a whole copy"):
        qopt.finetune(tiny, data, args, device_map="auto")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_cli_prints_one_line(two_ranks, tiny, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("hello world\n" * 50)
    assert main(["finetune", str(tiny), "--data", str(data), "-o", str(tmp_path / "out"),
                 "--device-map", "auto", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device-map cuda:1" in err


def test_one_process_keeps_every_map(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        assert world_size() == 1
        check_one_device_per_rank("auto")  # nothing to refuse
    assert spans_devices("auto") and spans_devices({"a": 0, "b": "cpu"})
    assert not spans_devices("cpu") and not spans_devices({"": 0}) and not spans_devices(None)
