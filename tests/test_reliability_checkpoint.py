"""Bad checkpoints give ONE clear qopt error naming the file and the tensor or field, before any long work.

Each case starts from a good tiny checkpoint written by qopt in tmp_path and damages one thing.
"""
from __future__ import annotations

import dataclasses
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qopt
import qopt.io.checkpoint as ckpt
from qopt import CheckpointError, ConfigError, OPTConfig, OPTForCausalLM
from qopt.loading.saving import model_state_for_saving
from qopt.model.config import REQUIRED_FIELDS
from tests.conftest import TINY, hf_config

SHARD = "60KB"  # the tiny model (~0.6 MB in fp32) becomes about ten shards


@pytest.fixture(scope="module")
def tiny_model() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**TINY)).eval()


@pytest.fixture
def single(tmp_path, tiny_model) -> Path:
    folder = tmp_path / "single"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture
def sharded(tmp_path, tiny_model) -> Path:
    folder = tmp_path / "sharded"
    tiny_model.save_pretrained(folder, max_shard_size=SHARD)
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    return folder


def header_of(file: Path) -> tuple[dict, int]:
    """The raw JSON header and its length, read independently of qopt (the test's oracle)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), n


def rewrite_header(file: Path, edit) -> None:
    """Apply `edit` to the header dict and write the file back with the same data bytes."""
    header, n = header_of(file)
    data = file.read_bytes()[8 + n:]
    edit(header)
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def last_tensor(file: Path) -> str:
    header, _ = header_of(file)
    header.pop("__metadata__", None)
    return max(header, key=lambda name: header[name]["data_offsets"][1])


def index_of(folder: Path) -> dict:
    return json.loads((folder / ckpt.SAFE_INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / ckpt.SAFE_INDEX).write_text(json.dumps(index))


def load_error(folder: Path, error: type[Exception] = CheckpointError) -> str:
    """Load through the public entry point; exactly the expected qopt error type, returned as its message."""
    with pytest.raises(error) as info:
        qopt.load(folder, progress=False)
    assert type(info.value) is error
    return str(info.value)


# -- safetensors files ------------------------------------------------------------------------------------
def test_good_checkpoints_load(single, sharded, tiny_model):
    ids = torch.randint(3, 1000, (1, 6))
    with torch.no_grad():
        want = tiny_model(ids).logits
        for folder in (single, sharded):
            assert torch.equal(OPTForCausalLM.from_pretrained(folder)(ids).logits, want)


def test_truncated_file_names_file_and_tensor(single):
    file = single / ckpt.SAFE_WEIGHTS
    victim = last_tensor(file)
    file.write_bytes(file.read_bytes()[:-100])
    message = load_error(single)
    assert str(file) in message and "truncated" in message and f"'{victim}'" in message


def test_truncated_later_shard_is_caught_before_any_tensor_is_read(sharded, monkeypatch):
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    opened = []
    real_open = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    message = load_error(sharded)
    assert str(shards[-1]) in message and "truncated" in message and f"'{last_tensor(shards[-1])}'" in message
    assert opened == [], "a shard was opened for reading before the headers were all validated"
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.inspect_checkpoint(sharded)


def test_file_cut_inside_its_header(single):
    file = single / ckpt.SAFE_WEIGHTS
    file.write_bytes(file.read_bytes()[:200])
    message = load_error(single)
    assert str(file) in message and "truncated or corrupt" in message


def test_garbage_instead_of_a_header(single):
    file = single / ckpt.SAFE_WEIGHTS
    data = bytearray(file.read_bytes())
    data[:64] = random.Random(1).randbytes(64)
    file.write_bytes(bytes(data))
    message = load_error(single)
    assert str(file) in message and "corrupt" in message


def test_damaged_header_json(single):
    file = single / ckpt.SAFE_WEIGHTS
    data = bytearray(file.read_bytes())
    at = data.index(b'"dtype"')
    data[at:at + 7] = b'"dtype '  # same length, no longer JSON
    file.write_bytes(bytes(data))
    message = load_error(single)
    assert str(file) in message and "corrupt safetensors header" in message


def test_data_offsets_beyond_the_file(single):
    file = single / ckpt.SAFE_WEIGHTS
    victim = last_tensor(file)

    def shift(header):
        header[victim]["data_offsets"] = [x + 4096 for x in header[victim]["data_offsets"]]

    rewrite_header(file, shift)
    message = load_error(single)
    assert str(file) in message and f"'{victim}'" in message and "ends at byte" in message


@pytest.mark.parametrize("damage, expected", [
    (lambda e: e.update(shape=[e["shape"][0] + 1, *e["shape"][1:]]), "header is inconsistent"),
    (lambda e: e.update(dtype="F64"), "header is inconsistent"),
    (lambda e: e.update(dtype="Q3"), "unsupported dtype 'Q3'"),
    (lambda e: e.update(shape="64"), "expected a list of non-negative integers"),
    (lambda e: e.pop("data_offsets"), "malformed header entry"),
])
def test_inconsistent_header_entry(single, damage, expected):
    file = single / ckpt.SAFE_WEIGHTS
    victim = "model.decoder.layers.1.fc1.weight"
    rewrite_header(file, lambda header: damage(header[victim]))
    message = load_error(single)
    assert str(file) in message and f"'{victim}'" in message and expected in message


def test_overlapping_tensors(single):
    file = single / ckpt.SAFE_WEIGHTS
    a, b = "model.decoder.layers.0.fc1.bias", "model.decoder.layers.1.fc1.bias"  # same size

    def swap_in_overlap(header):
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    rewrite_header(file, swap_in_overlap)
    message = load_error(single)
    assert str(file) in message and "overlap or leave a gap" in message


def test_bytes_appended_after_the_data(single):
    file = single / ckpt.SAFE_WEIGHTS
    file.write_bytes(file.read_bytes() + b"\0" * 16)
    message = load_error(single)
    assert str(file) in message and "16 data bytes after the last tensor" in message


# -- index ------------------------------------------------------------------------------------------------
def test_single_file_beside_an_index_is_ambiguous(sharded, single):
    """transformers would read model.safetensors, the index names other shards: refuse rather than guess."""
    (sharded / ckpt.SAFE_WEIGHTS).write_bytes((single / ckpt.SAFE_WEIGHTS).read_bytes())
    message = load_error(sharded)
    assert str(sharded) in message and ckpt.SAFE_WEIGHTS in message and ckpt.SAFE_INDEX in message


def test_index_names_a_shard_that_is_missing(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[2]
    victim.unlink()
    message = load_error(sharded)
    assert str(victim) in message and ckpt.SAFE_INDEX in message and "missing" in message


def test_shard_left_out_of_the_index(sharded):
    """A shard on disk that the index forgot: its tensors are missing, and the error lists them."""
    index = index_of(sharded)
    victim = sorted(sharded.glob("model-*.safetensors"))[1].name
    forgotten = sorted(name for name, file in index["weight_map"].items() if file == victim)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    write_index(sharded, index)
    message = load_error(sharded)
    assert str(sharded) in message and forgotten[0] in message and "missing" in message


def test_index_names_a_tensor_no_shard_has(sharded):
    index = index_of(sharded)
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.decoder.layers.0.fc3.weight"] = first
    write_index(sharded, index)
    message = load_error(sharded)
    assert ckpt.SAFE_INDEX in message and "'model.decoder.layers.0.fc3.weight'" in message and first in message


def test_index_maps_a_tensor_to_the_wrong_shard(sharded):
    index = index_of(sharded)
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    write_index(sharded, index)
    message = load_error(sharded)
    assert f"'{name}'" in message and files[1] in message


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": []}', "no 'weight_map'"),
    ('{"weight_map": {"model.decoder.embed_tokens.weight": 7}}', "'model.decoder.embed_tokens.weight'"),
    ('{"weight_map": {"model.decoder.embed_tokens.weight": "../elsewhere.safetensors"}}', "inside the folder"),
    ('[' * 100_000, "not valid JSON"),
])
def test_corrupt_index(sharded, text, expected):
    (sharded / ckpt.SAFE_INDEX).write_text(text)
    message = load_error(sharded)
    assert str(sharded / ckpt.SAFE_INDEX) in message and expected in message


# -- tensors that do not fit the config -------------------------------------------------------------------
def write_state(folder: Path, state: dict[str, torch.Tensor], config: OPTConfig) -> None:
    folder.mkdir()
    config.save_pretrained(folder)
    ckpt.write_safetensors_shards(state, folder)


def test_tensor_of_the_wrong_shape(tmp_path, tiny_model):
    state = model_state_for_saving(tiny_model)
    state["model.decoder.layers.1.fc1.weight"] = torch.zeros(127, 64)
    write_state(tmp_path / "bad", state, tiny_model.config)
    message = load_error(tmp_path / "bad")
    assert str(tmp_path / "bad" / ckpt.SAFE_WEIGHTS) in message
    assert "'model.decoder.layers.1.fc1.weight'" in message and "[127, 64]" in message and "[128, 64]" in message


def test_tensor_of_the_wrong_dtype(tmp_path, tiny_model):
    state = model_state_for_saving(tiny_model)
    state["model.decoder.layers.0.fc2.weight"] = torch.zeros(64, 128, dtype=torch.int32)
    write_state(tmp_path / "bad", state, tiny_model.config)
    message = load_error(tmp_path / "bad")
    assert "'model.decoder.layers.0.fc2.weight'" in message and "int32" in message


def test_missing_tensor(tmp_path, tiny_model):
    state = model_state_for_saving(tiny_model)
    del state["model.decoder.layers.1.final_layer_norm.bias"]
    write_state(tmp_path / "bad", state, tiny_model.config)
    assert "model.decoder.layers.1.final_layer_norm.bias" in load_error(tmp_path / "bad")


def test_header_shapes_are_checked_against_the_model_before_reading(tmp_path, tiny_model):
    """check_tensor_shapes needs only headers: it names the shard and tensor without reading any data."""
    state = model_state_for_saving(tiny_model)
    state["model.decoder.layers.1.fc1.weight"] = torch.zeros(127, 64)
    write_state(tmp_path / "bad", state, tiny_model.config)
    files = ckpt.inspect_checkpoint(tmp_path / "bad")
    expected = {name: p.shape for name, p in tiny_model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"fc1.weight' has shape \[127, 64\], config.json implies \[128, 64\]"):
        ckpt.check_tensor_shapes(files, expected)
    others = {k: v for k, v in files.tensors.items() if "layers.1.fc1" not in k}
    ckpt.check_tensor_shapes(dataclasses.replace(files, tensors=others), expected)  # everything else agrees
    int_weight = dataclasses.replace(others["model.decoder.layers.0.fc1.weight"], dtype=torch.int8)
    with pytest.raises(CheckpointError, match="layers.0.fc1.weight' has dtype torch.int8, expected a float"):
        ckpt.check_tensor_shapes(dataclasses.replace(files, tensors={"model.decoder.layers.0.fc1.weight": int_weight}),
                                 expected)


def test_checkpoint_with_more_layers_than_the_config(single):
    config = json.loads((single / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (single / "config.json").write_text(json.dumps(config))
    assert "model.decoder.layers.1" in load_error(single)


# -- config.json ------------------------------------------------------------------------------------------
CONFIG_DAMAGE = {
    "missing_hidden_size": (lambda c: c.pop("hidden_size"), "hidden_size"),
    "negative_layers": (lambda c: c.update(num_hidden_layers=-2), "num_hidden_layers"),
    "heads_do_not_divide_hidden": (lambda c: c.update(num_attention_heads=5), "num_attention_heads"),
    "string_for_int": (lambda c: c.update(ffn_dim="128"), "ffn_dim"),
    "float_for_int": (lambda c: c.update(vocab_size=1000.0), "vocab_size"),
    "unknown_activation": (lambda c: c.update(activation_function="swishy"), "activation_function"),
    "wrong_model_type": (lambda c: c.update(model_type="gpt2"), "model_type"),
    "dropout_out_of_range": (lambda c: c.update(dropout=2.5), "dropout"),
    "pad_id_past_vocab": (lambda c: c.update(pad_token_id=5000), "pad_token_id"),
    "bool_as_string": (lambda c: c.update(do_layer_norm_before="false"), "do_layer_norm_before"),
    "absurd_size": (lambda c: c.update(hidden_size=2**40), "hidden_size"),
    "unknown_dtype": (lambda c: c.update(torch_dtype="float8"), "torch_dtype"),
    "id2label_not_an_object": (lambda c: c.update(id2label=["a", "b"]), "id2label"),
}


def damage_config(folder: Path, case: str) -> str:
    """Apply one CONFIG_DAMAGE case to folder/config.json; returns the field the error must name."""
    damage, field = CONFIG_DAMAGE[case]
    config = json.loads((folder / "config.json").read_text())
    damage(config)
    (folder / "config.json").write_text(json.dumps(config))
    return field


@pytest.mark.parametrize("case", sorted(CONFIG_DAMAGE))
def test_bad_config_field(single, case):
    field = damage_config(single, case)
    message = load_error(single, ConfigError)
    assert str(single / "config.json") in message and f"'{field}'" in message


@pytest.mark.parametrize("text", ["{\"hidden_size\": 64,", "", "\xff\xfe not utf-8", "[1, 2]"])
def test_config_not_json_or_not_an_object(single, text):
    (single / "config.json").write_bytes(text.encode("latin-1"))
    message = load_error(single, ConfigError)
    assert str(single / "config.json") in message


def test_required_fields_are_written_by_transformers_and_qopt(tmp_path):
    """Requiring fields must not refuse a config.json written by transformers (as on the hub) or by qopt."""
    hf_config(num_labels=3).save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(written) and set(REQUIRED_FIELDS) <= set(OPTConfig().to_dict())
    config = OPTConfig.from_pretrained(tmp_path / "hf")
    assert (config.hidden_size, config.num_labels) == (TINY["hidden_size"], 3)


def test_missing_config_and_missing_folder(tmp_path, single):
    (single / "config.json").unlink()
    assert "config.json" in load_error(single, ConfigError)
    assert str(tmp_path / "nowhere") in load_error(tmp_path / "nowhere", ConfigError)


# -- pytorch_model.bin ------------------------------------------------------------------------------------
def write_bin(folder: Path, state: dict, config: OPTConfig) -> None:
    folder.mkdir()
    config.save_pretrained(folder)
    torch.save(state, folder / ckpt.BIN_WEIGHTS)


def test_plain_bin_checkpoint_loads(tmp_path, tiny_model):
    write_bin(tmp_path / "bin", model_state_for_saving(tiny_model), tiny_model.config)
    ids = torch.randint(3, 1000, (1, 5))
    with torch.no_grad():
        assert torch.equal(qopt.load(tmp_path / "bin")(ids).logits, tiny_model(ids).logits)


def write_bin_with_code(folder: Path, model: OPTForCausalLM, marker: Path) -> None:
    """A pytorch_model.bin whose unpickling runs code: it would create `marker`."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    write_bin(folder, dict(model_state_for_saving(model), payload=Payload()), model.config)


def test_bin_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path, tiny_model):
    marker = tmp_path / "code-ran"
    write_bin_with_code(tmp_path / "evil", tiny_model, marker)
    message = load_error(tmp_path / "evil")
    assert str(tmp_path / "evil" / ckpt.BIN_WEIGHTS) in message and "refused" in message and "\n" not in message
    assert not marker.exists(), "qopt ran code from a pickle"
    # the payload is real: an unsafe load would have run it
    torch.load(tmp_path / "evil" / ckpt.BIN_WEIGHTS, weights_only=False)
    assert marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path, tiny_model):
    write_bin(tmp_path / "list", [torch.zeros(2)], tiny_model.config)
    assert "expected a dict of tensor name -> tensor" in load_error(tmp_path / "list")
    (tmp_path / "list" / ckpt.BIN_WEIGHTS).write_bytes(b"PK\x03\x04 garbage")
    message = load_error(tmp_path / "list")
    assert str(tmp_path / "list" / ckpt.BIN_WEIGHTS) in message and "unreadable" in message


# -- the command line: one line on stderr, exit status 2, nothing written ---------------------------------
def run_cli(capsys, *argv: str) -> str:
    from qopt.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err  # a progress bar may precede the error; the error is the one last line
    lines = err.splitlines()
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err
    assert err.endswith("\n") and lines[-1].startswith(f"qopt {argv[0]}: error: ")
    return lines[-1]


def test_cli_quantize_reports_a_truncated_shard_in_one_line(capsys, sharded, tmp_path):
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    err = run_cli(capsys, "quantize", str(sharded), "--out", str(tmp_path / "out"))
    assert err.startswith("qopt quantize: error: ") and str(shards[-1]) in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_cli_quantize_refuses_pickled_code_in_one_line(capsys, tmp_path, tiny_model):
    marker = tmp_path / "code-ran"
    write_bin_with_code(tmp_path / "evil", tiny_model, marker)
    err = run_cli(capsys, "quantize", str(tmp_path / "evil"), "--out", str(tmp_path / "out"))
    assert "refused" in err and ckpt.BIN_WEIGHTS in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["negative_layers", "missing_hidden_size", "unknown_activation"])
def test_cli_plan_reports_a_bad_config_field_in_one_line(capsys, single, case):
    field = damage_config(single, case)
    err = run_cli(capsys, "plan", str(single))
    assert str(single / "config.json") in err and f"'{field}'" in err


def test_cli_process_prints_one_line_and_exits_2(single, tmp_path):
    """The real `qopt` process: exit status 2, a single stderr line, no traceback."""
    (single / "config.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "qopt.cli", "quantize", str(single), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(single / "config.json") in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()
