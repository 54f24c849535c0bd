"""Property tests: the parsers of untrusted input raise only their own qopt error, and what they accept is sound.

- safetensors headers: arbitrary bytes and damaged real files give CheckpointError or a header that the
  safetensors library itself reads with the same names, dtypes and shapes (a differential check);
- index files: CheckpointError, or a weight map whose shards exist and hold their tensors;
- config.json dicts: ConfigError, or a config that round-trips and builds a model (on the meta device);
- the tokenizer: any text encodes to in-vocabulary ids and decodes back to itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from qopt import CheckpointError, ConfigError, OPTConfig, OPTForCausalLM, OPTTokenizer
from qopt.io.checkpoint import _ST_DTYPES, SAFE_INDEX, inspect_checkpoint, read_safetensors_header


def fuzz(examples: int) -> settings:
    """Modest by default so the file runs in well under a minute; QOPT_FUZZ_SCALE=20 searches deeper."""
    return settings(max_examples=examples * int(os.environ.get("QOPT_FUZZ_SCALE", "1")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- safetensors headers ----------------------------------------------------------------------------------
def parse_or_refuse(file: Path) -> None:
    """Only CheckpointError may escape; an accepted header must agree with the safetensors library."""
    try:
        tensors, metadata = read_safetensors_header(file)
    except CheckpointError as err:
        assert str(file) in str(err)
        event("refused")
        return
    event("accepted")
    with safe_open(file, framework="pt") as fh:
        assert set(fh.keys()) == set(tensors)
        assert (fh.metadata() or {}) == metadata
        for name, info in tensors.items():
            tensor = fh.get_tensor(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (info.dtype, info.shape), name


@fuzz(300)
@given(data=st.binary(max_size=600) | st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                                                 st.integers(0, 700), st.binary(max_size=600)))
def test_header_parser_on_arbitrary_bytes(scratch, data):
    file = scratch / "arbitrary.safetensors"
    file.write_bytes(data)
    parse_or_refuse(file)


tensor_specs = st.tuples(st.sampled_from(sorted(_ST_DTYPES)), st.lists(st.integers(0, 3), max_size=3))


@st.composite
def damaged_files(draw) -> tuple[bytes, bool]:
    """A real safetensors file, then maybe one damage: truncation, flipped bytes, appended bytes or a header edit."""
    # at least one tensor: safetensors 0.8.0 writes invalid JSON for no tensors with metadata={}
    specs = draw(st.dictionaries(st.text(max_size=6), tensor_specs, min_size=1, max_size=4))
    tensors = {name: torch.zeros(shape, dtype=_ST_DTYPES[dtype][0]) for name, (dtype, shape) in specs.items()}
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    raw = bytearray(safetensors_bytes(tensors, metadata=metadata))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "append", "edit"]))
    if damage == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    elif damage == "append":
        raw += draw(st.binary(min_size=1, max_size=16))
    elif damage == "edit":
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        key = draw(st.sampled_from(sorted(header)))
        if isinstance(header[key], dict) and draw(st.booleans()):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "other"]))
            header[key][field] = draw(json_values | st.sampled_from(sorted(_ST_DTYPES) + ["U16", "F4"]))
        else:
            header[key] = draw(json_values)
        text = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return bytes(raw), damage == "none"


@fuzz(300)
@given(case=damaged_files())
def test_header_parser_on_damaged_real_files(scratch, case):
    raw, intact = case
    file = scratch / "damaged.safetensors"
    file.write_bytes(raw)
    if intact:
        read_safetensors_header(file)  # every file the safetensors library writes is accepted
    parse_or_refuse(file)


# -- index files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(scratch) -> Path:
    folder = scratch / "indexed"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(safetensors_bytes({"x": torch.zeros(2), "y": torch.ones(3)}))
    return folder


names = st.sampled_from(["x", "y", "z"]) | st.text(max_size=6)
shard_names = st.sampled_from(["a.safetensors", "b.safetensors", "../a.safetensors", "", "."]) | st.text(max_size=8)
weight_maps = st.dictionaries(names, shard_names | json_values, max_size=3) | \
    st.dictionaries(st.sampled_from(["x", "y"]), st.just("a.safetensors"), max_size=2)  # often valid
indexes = (json_values | st.fixed_dictionaries({"weight_map": weight_maps})
           | st.fixed_dictionaries({"metadata": json_values, "weight_map": weight_maps}))


@fuzz(300)
@given(content=indexes.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200))
def test_index_parser(indexed, content):
    (indexed / SAFE_INDEX).write_bytes(content)
    try:
        files = inspect_checkpoint(indexed)
    except CheckpointError as err:
        assert str(indexed) in str(err)
        event("refused")
        return
    event("accepted")
    weight_map = json.loads(content)["weight_map"]  # accepted: every entry names a tensor its shard holds
    assert weight_map and set(weight_map) <= set(files.tensors) and set(weight_map.values()) == {"a.safetensors"}
    assert files.shards == [indexed / "a.safetensors"]


# -- config.json ------------------------------------------------------------------------------------------
FIELDS = sorted(OPTConfig().to_dict()) + ["dtype", "id2label", "num_labels"]
plausible = {
    "vocab_size": st.integers(3, 64), "hidden_size": st.sampled_from([4, 8, 12]),
    "num_hidden_layers": st.integers(1, 3), "ffn_dim": st.integers(1, 16),
    "num_attention_heads": st.sampled_from([1, 2, 4]), "max_position_embeddings": st.integers(1, 32),
    "word_embed_proj_dim": st.none() | st.sampled_from([4, 8]), "activation_function": st.sampled_from(
        ["relu", "gelu", "swish", "bogus"]), "torch_dtype": st.sampled_from([None, "float16", "bfloat16", "int8"]),
    "pad_token_id": st.integers(-1, 4) | st.none(), "bos_token_id": st.integers(0, 4),
    "eos_token_id": st.integers(0, 4), "dropout": st.floats(-0.5, 1.5), "id2label": st.dictionaries(
        st.text(max_size=2), st.text(max_size=2), max_size=3),
}
config_dicts = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=8) | \
    st.fixed_dictionaries({}, optional={k: v | json_values for k, v in plausible.items()})


@fuzz(400)
@given(data=config_dicts)
def test_config_from_dict_raises_only_config_error(data):
    try:
        config = OPTConfig.from_dict(data)
    except ConfigError:
        event("refused")
        return
    event("accepted")
    written = json.loads(json.dumps(config.to_dict()))
    again = OPTConfig.from_dict(written)  # what qopt writes, it reads back and writes the same
    assert again.to_dict() == written
    assert dataclasses.replace(again, extra={}) == dataclasses.replace(config, extra={})  # every typed field
    if config.num_hidden_layers <= 4 and config.hidden_size * config.vocab_size <= 2**20:
        with init_empty_weights():
            model = OPTForCausalLM(config)
        assert model.lm_head.weight.shape == (config.vocab_size, config.word_embed_proj_dim)


# -- tokenizer --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> OPTTokenizer:
    return OPTTokenizer.from_pretrained()


SPECIAL = ("</s>", "<pad>")


@fuzz(300)
@given(text=st.text(max_size=120) | st.text(alphabet="ab \n\t</s>éü漢🙂\u200b\x00", max_size=40))
def test_tokenizer_round_trips_any_text(tokenizer, text):
    assume(not any(s in text for s in SPECIAL))
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@fuzz(100)
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_tokenizer_batches_agree_with_single_texts(tokenizer, texts):
    assume(not any(s in t for t in texts for s in SPECIAL))
    batch = tokenizer(texts, padding=True, return_tensors="pt", padding_side="left")
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts, strict=True):
        assert row[mask.bool()].tolist() == tokenizer.encode(text)


@fuzz(50)
@given(text=st.text(max_size=20), at=st.integers(0, 20), surrogate=st.integers(0xD800, 0xDFFF))
def test_tokenizer_names_an_unpaired_surrogate(tokenizer, text, at, surrogate):
    at = min(at, len(text))
    bad = text[:at] + chr(surrogate) + text[at:]
    with pytest.raises(ValueError, match=f"unpaired surrogate U\\+{surrogate:04X} at character {at}"):
        tokenizer.encode(bad)
