"""Streaming quantize-on-load: parity with transformers + bitsandbytes, pre-quantized checkpoints, disk offload."""
import errno
import gc
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qopt
from qopt import cli
from qopt.errors import CheckpointError, ConfigError, PlanError
from qopt.quant import quantizers
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import is_quantized, quantize_model
from tests.test_quantization import PRESETS, same_state

BF16 = torch.bfloat16
IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def bnb_config(name: str, compute=BF16):
    from transformers import BitsAndBytesConfig

    ours = QuantizationConfig.from_name(name, bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=ours.load_in_8bit, load_in_4bit=ours.load_in_4bit,
                              bnb_4bit_quant_type=ours.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=ours.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute)


def peer_load(folder, **kwargs):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(folder, **kwargs).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def load(folder, **kwargs):
    return qopt.load(folder, progress=False, **kwargs)


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """A float16 checkpoint written by transformers, like the released OPT files."""
    from tests.conftest import make_hf_model

    folder = tmp_path_factory.mktemp("fp16") / "ckpt"
    make_hf_model(peaky=3.0).half().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def four_layer_checkpoint(tmp_path_factory):
    from tests.conftest import make_hf_model

    folder = tmp_path_factory.mktemp("fp16x4") / "ckpt"
    make_hf_model(peaky=3.0, num_hidden_layers=4).half().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", PRESETS)
def test_same_tensors_and_logits_as_transformers_loading_the_same_checkpoint(fp16_checkpoint, name):
    peer = peer_load(fp16_checkpoint, quantization_config=bnb_config(name), dtype=BF16)
    ours = load(fp16_checkpoint, quantization=name, torch_dtype=BF16)
    assert same_state(peer.state_dict(), ours.state_dict())  # byte for byte, statistics included
    assert torch.equal(logits(ours), logits(peer))


def test_float32_model_with_bf16_compute_matches_transformers(fp16_checkpoint):
    peer = peer_load(fp16_checkpoint, quantization_config=bnb_config("nf4"), dtype=torch.float32)
    ours = qopt.OPTForCausalLM.from_pretrained(fp16_checkpoint, quantization_config=bnb_config("nf4"),
                                               torch_dtype=torch.float32, progress=False)
    assert ours.dtype == torch.float32
    assert torch.equal(logits(ours), logits(peer))


@pytest.mark.parametrize("name", PRESETS)
def test_transformers_loads_our_prequantized_checkpoint(fp16_checkpoint, tmp_path, name):
    ours = load(fp16_checkpoint, quantization=name, torch_dtype=BF16)
    ours.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"] == QuantizationConfig.from_name(name).to_dict()
    peer = peer_load(tmp_path / "q", dtype=BF16)
    assert type(peer.model.decoder.layers[0].fc1).__name__ == ("Linear8bitLt" if name == "int8" else "Linear4bit")
    assert torch.equal(logits(peer), logits(ours))


@pytest.mark.parametrize("name", ["int8", "fp4-dq"])
def test_we_load_transformers_prequantized_checkpoint(fp16_checkpoint, tmp_path, name):
    peer = peer_load(fp16_checkpoint, quantization_config=bnb_config(name), dtype=BF16)
    peer.save_pretrained(tmp_path / "peer")  # before any forward: bitsandbytes' own save is then exact
    ours = load(tmp_path / "peer", torch_dtype="auto")
    assert same_state(ours.state_dict(), peer.state_dict())
    assert torch.equal(logits(ours), logits(peer))


def test_projection_variant_quantizes_like_transformers(tmp_path):
    """OPT-350m's shape: project_in / project_out are quantized too; a 32-wide projection is too narrow for
    bitsandbytes' CPU repack (transformers' forward fails there), so qopt runs it unpacked."""
    from tests.conftest import VARIANTS, make_hf_model

    make_hf_model(peaky=3.0, **VARIANTS["post_ln_proj"]).half().save_pretrained(tmp_path / "proj")
    peer = peer_load(tmp_path / "proj", quantization_config=bnb_config("nf4"), dtype=BF16)
    ours = load(tmp_path / "proj", quantization="nf4", torch_dtype=BF16)
    assert type(ours.model.decoder.project_in).__name__ == "Linear4bit"
    assert same_state(ours.state_dict(), peer.state_dict())
    reference = load(tmp_path / "proj", torch_dtype=BF16)
    got, expected = logits(ours).float(), logits(reference).float()
    assert (got - expected).abs().max() <= 0.2 * expected.abs().max()


@pytest.mark.parametrize("name", PRESETS)
def test_prequantized_round_trip_is_exact_and_never_requantizes(fp16_checkpoint, tmp_path, monkeypatch, name):
    ours = load(fp16_checkpoint, quantization=name, torch_dtype=BF16)
    ours.save_pretrained(tmp_path / "before")
    expected = logits(ours)  # repacks the 4-bit weights for the CPU kernel
    ours.save_pretrained(tmp_path / "after")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / file).read_bytes() == (tmp_path / "after" / file).read_bytes()
    for quantizer in ("quantize_4bit", "quantize_int8_rows"):  # every quantizing path goes through these
        monkeypatch.setattr(quantizers, quantizer, lambda *a, **k: pytest.fail("re-quantized"))
    again = load(tmp_path / "before", torch_dtype=BF16)
    assert same_state(again.state_dict(), load_file(tmp_path / "before" / "model.safetensors")
                      | {"lm_head.weight": again.lm_head.weight})
    assert torch.equal(logits(again), expected)
    with pytest.raises(ConfigError, match="already quantized"):
        load(tmp_path / "before", quantization="fp4" if name != "fp4" else "nf4")


def test_sharded_prequantized_checkpoint_with_statistics_across_shards(fp16_checkpoint, tmp_path):
    ours = load(fp16_checkpoint, quantization="nf4-dq", torch_dtype=BF16)
    ours.save_pretrained(tmp_path / "q", max_shard_size="3KB")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    shards_of: dict[str, set] = {}
    for key, file in index.items():
        shards_of.setdefault(key.split(".weight")[0].removesuffix(".bias"), set()).add(file)
    assert any(len(files) > 1 for files in shards_of.values())  # a layer's tensors straddle two shards
    assert torch.equal(logits(load(tmp_path / "q", torch_dtype=BF16)), logits(ours))
    assert torch.equal(logits(peer_load(tmp_path / "q", dtype=BF16)), logits(ours))


def test_missing_statistic_is_named(fp16_checkpoint, tmp_path):
    load(fp16_checkpoint, quantization="nf4", torch_dtype=BF16).save_pretrained(tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    state = load_file(file)
    del state["model.decoder.layers.1.fc2.weight.absmax"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.weight\.absmax"):
        load(tmp_path / "q")


def test_mixed_precision_checkpoint_loads(fp16_checkpoint, tmp_path):
    bits = {"model.decoder.layers.0.fc1": 8, "model.decoder.layers.1.fc2": 16}
    config = QuantizationConfig(load_in_4bit=True, module_bits=bits)
    model = quantize_model(load(fp16_checkpoint, torch_dtype=BF16), config)
    model.save_pretrained(tmp_path / "mixed")
    loaded = load(tmp_path / "mixed", torch_dtype=BF16)
    layers = loaded.model.decoder.layers
    assert type(layers[0].fc1).__name__ == "Linear8bitLt" and type(layers[1].fc2) is torch.nn.Linear
    assert type(layers[1].fc1).__name__ == "Linear4bit"
    assert torch.equal(logits(loaded), logits(model))


def two_layer_budget(model) -> tuple[int, int]:
    """A CPU budget with room for two decoder layers beside the embeddings, and the bytes of one layer."""
    layer = sum(t.numel() * t.element_size() for t in model.model.decoder.layers[0].state_dict().values())
    rest = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if ".layers." not in n and n != "lm_head.weight")
    return rest + 2 * layer + layer // 2, layer


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_disk_offload_gives_the_in_memory_logits(four_layer_checkpoint, tmp_path, name):
    in_memory = load(four_layer_checkpoint, quantization=name, torch_dtype=BF16)
    budget, _ = two_layer_budget(in_memory)
    offloaded = load(four_layer_checkpoint, quantization=name, torch_dtype=BF16, device_map="auto",
                     max_memory={"cpu": budget}, offload_folder=tmp_path)
    on_disk = [n for n, d in offloaded.hf_device_map.items() if d == "disk"]
    assert on_disk and all(".layers." in n for n in on_disk) and "cpu" in offloaded.hf_device_map.values()
    assert all(p.device.type == "meta" for n in on_disk for p in offloaded.get_submodule(n).parameters())
    assert torch.equal(logits(offloaded), logits(in_memory))
    # layers are rebuilt for each forward and dropped again; incremental decoding works through the hooks
    assert all(p.device.type == "meta" for n in on_disk for p in offloaded.get_submodule(n).parameters())
    steps = []
    with torch.no_grad():
        for model in (offloaded, in_memory):
            first = model(IDS[:, :8], use_cache=True)
            steps.append(model(IDS[:, 8:9], past_key_values=first.past_key_values, use_cache=True).logits)
    assert torch.equal(*steps)
    in_memory.save_pretrained(tmp_path / "a")
    offloaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("qopt-offload-")]
    assert len(folders) == 1
    del offloaded, first
    gc.collect()
    assert not folders[0].exists()  # the offload folder lives as long as its model


def test_explicit_device_map_with_a_disk_layer(four_layer_checkpoint, tmp_path):
    keep = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.final_layer_norm",
            "lm_head", "model.decoder.layers.0", "model.decoder.layers.1", "model.decoder.layers.2"]
    device_map = {**{name: "cpu" for name in keep}, "model.decoder.layers.3": "disk"}
    offloaded = load(four_layer_checkpoint, quantization="fp4", torch_dtype=BF16, device_map=device_map,
                     offload_folder=tmp_path)
    assert offloaded.hf_device_map == device_map
    assert torch.equal(logits(offloaded), logits(load(four_layer_checkpoint, quantization="fp4", torch_dtype=BF16)))


def test_offload_folder_without_space_is_refused_before_any_tensor_is_read(four_layer_checkpoint, tmp_path,
                                                                          monkeypatch):
    from collections import namedtuple

    import qopt.loading.loader

    budget, layer = two_layer_budget(load(four_layer_checkpoint, quantization="nf4", torch_dtype=BF16))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(qopt.loading.loader.shutil, "disk_usage", lambda path: usage(10 * layer, 9 * layer, layer))
    monkeypatch.setattr(qopt.loading.loader, "iter_shard_tensors",
                        lambda *a: pytest.fail("read before the space check"))
    with pytest.raises(PlanError, match=r"offload folder .*: [\d.]+ KiB free, but the layers placed on disk "
                                        r"\(disk: layers [\d-]+\) need [\d.]+ KiB"):
        load(four_layer_checkpoint, quantization="nf4", torch_dtype=BF16, device_map="auto",
             max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    assert list((tmp_path / "offload").iterdir()) == []


def _full_after_first_file(folder: Path):
    """`open` for qopt.offload: the first tensor file opens, every later one finds the disk full."""
    opened = []

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).parent.parent == folder:  # folder/qopt-offload-*/NAME.dat
            if opened:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            opened.append(path)
        return open(path, mode, *args, **kwargs)
    return fake_open


def test_offload_files_are_what_accelerate_writes_and_reads(tmp_path):
    from accelerate.utils import load_offloaded_weight, offload_weight

    from qopt.place.offload import OffloadFolder

    ours, index = OffloadFolder(tmp_path / "ours"), {}
    (tmp_path / "theirs").mkdir()
    tensors = {"a.weight": torch.randn(5, 7, dtype=BF16), "b.absmax": torch.rand(9), "c.weight": torch.randint(
        0, 255, (6, 1), dtype=torch.uint8), "d.scalar": torch.tensor(3.5), "e.codes": torch.randn(4, 4)[:, ::2]}
    for name, tensor in tensors.items():
        ours.put(name, tensor)
        offload_weight(tensor.contiguous(), name, str(tmp_path / "theirs"), index=index)
    assert ours.index == index
    for name, tensor in tensors.items():
        assert (tmp_path / "ours" / f"{name}.dat").read_bytes() == (tmp_path / "theirs" / f"{name}.dat").read_bytes()
        back = load_offloaded_weight(str(tmp_path / "ours" / f"{name}.dat"), ours.index[name])
        assert torch.equal(back, tensor)


@pytest.mark.parametrize("filesystem", ["simulated", "tmpfs"])
def test_offload_folder_filling_up_mid_load_names_the_tensor_and_leaves_nothing(four_layer_checkpoint, tmp_path,
                                                                              monkeypatch, filesystem):
    """The space check passed, then the disk filled (another writer): one error naming the tensor, no debris."""
    import qopt.loading.loader
    import qopt.place.offload

    budget, layer = two_layer_budget(load(four_layer_checkpoint, quantization="nf4", torch_dtype=BF16))
    folder = tmp_path / "offload"
    folder.mkdir()
    if filesystem == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={layer // 2}", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
        plenty = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(qopt.loading.loader.shutil, "disk_usage", lambda path: plenty)
    else:
        monkeypatch.setattr(qopt.place.offload, "open", _full_after_first_file(folder), raising=False)
    try:
        with pytest.raises(PlanError, match=r"offload folder .*: no space left writing "
                                            r"'model\.decoder\.layers\.\d\.[\w.]+' \([\d.]+ (B|KiB);"):
            load(four_layer_checkpoint, quantization="nf4", torch_dtype=BF16, device_map="auto",
                 max_memory={"cpu": budget}, offload_folder=folder)
        assert list(folder.iterdir()) == []  # the partial offload folder was removed
    finally:
        if filesystem == "tmpfs":
            subprocess.run(["umount", str(folder)], check=True)


def test_placement_errors(four_layer_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="offload_folder"):
        load(four_layer_checkpoint, quantization="nf4", torch_dtype=BF16, device_map="auto",
             max_memory={"cpu": 180_000})
    with pytest.raises(PlanError, match="only decoder layers"):
        load(four_layer_checkpoint, quantization="nf4", device_map="auto", max_memory={"cpu": 10_000},
             offload_folder=tmp_path)
    with pytest.raises(PlanError, match="unknown device"):
        load(four_layer_checkpoint, quantization="nf4", device_map="auto", max_memory={"npu": 10_000})


def test_checkpoint_layers_beyond_the_config_are_refused(fp16_checkpoint, tmp_path):
    import shutil

    shutil.copytree(fp16_checkpoint, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"decoder layer 1, but config.json declares 1 layers"):
        load(tmp_path / "c", quantization="nf4")


def test_unquantized_load_is_unchanged(fp16_checkpoint):
    model = load(fp16_checkpoint, torch_dtype=BF16)
    assert model.config.quantization_config is None and not any(is_quantized(m) for m in model.modules())
    assert model.dtype == BF16 and model.hf_device_map == {"": "cpu"}
    assert torch.equal(logits(model), logits(peer_load(fp16_checkpoint, dtype=BF16)))


def test_cli_quantize_writes_a_checkpoint_transformers_loads(fp16_checkpoint, tmp_path, capsys):
    assert cli.main(["quantize", str(fp16_checkpoint), "--out", str(tmp_path / "q"), "--bits", "4",
                     "--quant-type", "fp4", "--double-quant"]) == 0
    assert "fp4-dq, 12 quantized layers" in capsys.readouterr().out
    ours = load(tmp_path / "q", torch_dtype="auto")
    assert ours.dtype == BF16 and ours.config.quantization_config == QuantizationConfig.from_name("fp4-dq").to_dict()
    assert torch.equal(logits(peer_load(tmp_path / "q", dtype=BF16)), logits(ours))
    assert cli.main(["quantize", str(fp16_checkpoint), "--out", str(tmp_path / "x"), "--bits", "8",
                     "--double-quant"]) == 2
    assert "apply to --bits 4" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_placement_matches_cpu(fp16_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    gpu = load(fp16_checkpoint, quantization="nf4", torch_dtype=BF16, device_map="auto")
    assert set(gpu.hf_device_map.values()) == {0}
    cpu = load(fp16_checkpoint, quantization="nf4", torch_dtype=BF16)
    assert torch.allclose(logits(gpu, IDS.cuda()).cpu().float(), logits(cpu).float(), atol=0.1)
    split = load(fp16_checkpoint, quantization="int8", torch_dtype=BF16, device_map={
        "model.decoder.embed_tokens": 0, "lm_head": 0, "model.decoder.embed_positions": 0,
        "model.decoder.final_layer_norm": 0, "model.decoder.layers.0": 0, "model.decoder.layers.1": "cpu"})
    assert torch.isfinite(logits(split, IDS.cuda()).float()).all()
