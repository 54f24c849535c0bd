"""Calibrated (GPTQ) quantization: exact bitsandbytes grids and bytes, error reduction, streaming, sensitivity."""
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

import qopt
from qopt.calibration import layerwise as cal
from qopt.calibration.layerwise import CalibrationConfig, calibrate, calibration_windows, mixed_precision
from qopt.calibration.sensitivity import (
    Sensitivity,
    choose_precision,
    decoder_linear_names,
    layer_sensitivity,
    model_bytes,
)
from qopt.errors import PlanError
from qopt.quant.config import QuantizationConfig
from qopt.quant.gptq import Grid, HessianAccumulator, gptq_round, output_error
from tests.conftest import VARIANTS


def correlated_inputs(features: int, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * 0.3 + torch.eye(features)
    x = torch.randn(tokens, features, generator=g) @ mix
    x[:, :3] *= 8
    return x


def random_weight(out: int = 48, inp: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[2, 7] = 0.6  # an outlier, so one block's absmax differs from the rest
    return w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identity_hessian_reproduces_bitsandbytes_quantize_4bit_bytes(quant_type, dtype):
    w = random_weight().to(dtype)
    rounded = gptq_round(w, torch.eye(w.shape[1]), Grid(quant_type))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert torch.equal(rounded.packed(), packed)
    assert torch.equal(rounded.quant_state(dtype).absmax, state.absmax)
    assert torch.equal(bnbf.dequantize_4bit(packed, state).float(), rounded.dequantized.to(dtype).float())


def test_identity_hessian_reproduces_llm_int8_rows():
    w = random_weight().to(torch.bfloat16)
    rounded = gptq_round(w, torch.eye(w.shape[1]), Grid("int8"))
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    codes, scales = rounded.int8()
    assert torch.equal(codes, cb) and torch.equal(scales, scb)


def test_double_quant_statistics_and_stored_values_are_what_was_optimised():
    w = random_weight()
    # identity Hessian: the compressed statistics are bitsandbytes' own
    plain = gptq_round(w, torch.eye(w.shape[1]), Grid("nf4", double_quant=True))
    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = plain.quant_state(torch.float32)
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.state2.absmax, state.state2.absmax)
    assert ours.offset.item() == state.offset.item()
    # with error feedback, what bitsandbytes reads back from the stored bytes is exactly the optimised weight
    hessian = HessianAccumulator(w.shape[1])
    hessian.add(correlated_inputs(w.shape[1]))
    rounded = gptq_round(w, hessian.hessian, Grid("nf4", double_quant=True))
    restored = bnbf.dequantize_4bit(rounded.packed(), rounded.quant_state(torch.float32))
    assert torch.equal(restored, rounded.dequantized)


@pytest.mark.parametrize("name", ["nf4", "fp4", "nf4-dq", "int8"])
def test_calibrated_layer_output_error_is_lower_than_round_to_nearest(name):
    w = random_weight(64, 256)
    x = correlated_inputs(256, tokens=2048)
    acc = HessianAccumulator(256)
    for chunk in x.split(300):  # accumulated over batches like calibration windows
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    grid = cal.grid_for_bits(8 if name == "int8" else 4, QuantizationConfig.from_name(name))
    calibrated = gptq_round(w, acc.hessian, grid)
    rtn = cal.rtn_dequantized(w, grid)
    err_cal = ((x @ (w - calibrated.dequantized).t()) ** 2).mean().item()
    err_rtn = ((x @ (w - rtn).t()) ** 2).mean().item()
    assert err_cal < 0.75 * err_rtn
    # the Hessian form of the error is the measured one (mean over tokens, summed over outputs)
    assert output_error(w, calibrated.dequantized, acc.hessian) == pytest.approx(err_cal * w.shape[0], rel=1e-3)


def test_clip_search_never_worse_per_block_and_helps_rtn():
    w = random_weight(64, 256)
    plain = gptq_round(w, None, Grid("nf4"))
    searched = gptq_round(w, None, Grid("nf4"), clip_search=16)
    assert ((w - searched.dequantized) ** 2).sum() < ((w - plain.dequantized) ** 2).sum()
    restored = bnbf.dequantize_4bit(searched.packed(), searched.quant_state(torch.float32))
    assert torch.equal(restored, searched.dequantized)


@pytest.mark.parametrize("double_quant", [False, True])
def test_act_order_with_static_absmax_stores_what_it_optimised(double_quant):
    w = random_weight(64, 256)
    x = correlated_inputs(256)
    acc = HessianAccumulator(256)
    acc.add(x)
    grid = Grid("nf4", double_quant=double_quant)
    rounded = gptq_round(w, acc.hessian, grid, act_order=True, clip_search=8)
    restored = bnbf.dequantize_4bit(rounded.packed(), rounded.quant_state(torch.float32))
    assert torch.equal(restored, rounded.dequantized)
    err = ((x @ (w - rounded.dequantized).t()) ** 2).mean()
    assert err < 0.75 * ((x @ (w - cal.rtn_dequantized(w, grid)).t()) ** 2).mean()


def test_rejects_blocks_that_would_straddle_rows():
    with pytest.raises(ValueError, match="multiple of the block size"):
        gptq_round(torch.randn(4, 96), None, Grid("nf4"))


# -- whole models ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_checkpoint(hf_checkpoint):
    folder, _ = hf_checkpoint()
    return folder


@pytest.fixture
def windows():
    return torch.randint(3, 1000, (8, 32), generator=torch.Generator().manual_seed(0))


def test_streaming_keeps_one_float_decoder_layer_and_equals_in_memory(tiny_checkpoint, windows, monkeypatch):
    seen = []
    original = cal.read_tensors

    def spy(model, *rest):
        original(model, *rest)
        layers = model.model.decoder.layers
        seen.append(sum(1 for layer in layers if any(type(m) is torch.nn.Linear and m.weight.device.type != "meta"
                                                     for m in layer.modules())))

    monkeypatch.setattr(cal, "read_tensors", spy)
    streamed, report = calibrate(tiny_checkpoint, windows, progress=False)
    assert max(seen) == 1 and len(seen) == 1 + streamed.config.num_hidden_layers
    in_memory, _ = calibrate(qopt.load(tiny_checkpoint), windows, progress=False)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(report.modules) == 12 and all(m.calibrated_error <= m.rtn_error for m in report.modules)


def _broken_copy(folder, target, change):
    """`folder` with its one shard rewritten by `change(state)` (the config copied unchanged)."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("change", [
    lambda s: s.pop("model.decoder.layers.1.fc1.bias"),  # missing from a decoder layer read later
    lambda s: s.pop("model.decoder.embed_positions.weight"),  # missing from the skeleton
    lambda s: s.update({"model.decoder.layers.1.fc2.weight": torch.zeros(64, 127)}),  # mis-shaped
    lambda s: s.update({"model.decoder.layers.1.fc2.bias": torch.zeros(64, dtype=torch.int32)}),  # not a float
    lambda s: s.update({"model.decoder.layers.2.fc2.bias": torch.zeros(64)}),  # a layer config.json lacks
], ids=["missing-layer-tensor", "missing-embedding", "shape", "dtype", "extra-layer"])
def test_streamed_calibration_refuses_a_bad_checkpoint_in_the_loaders_words(tiny_checkpoint, windows, tmp_path,
                                                                              change):
    """Calibration reads through the loader's rules, so it fails where and as `qopt.load` does: one line naming
    the file and the tensor."""
    from qopt.errors import CheckpointError

    bad = _broken_copy(tiny_checkpoint, tmp_path / "bad", change)
    with pytest.raises(CheckpointError) as loaded:
        qopt.load(bad, progress=False)
    with pytest.raises(CheckpointError) as calibrated:
        calibrate(bad, windows, progress=False)
    assert str(calibrated.value) == str(loaded.value)
    assert str(bad) in str(calibrated.value) and "model.decoder." in str(calibrated.value)


def test_a_layer_read_opens_only_its_shards_and_fills_only_its_tensors(tiny_checkpoint, tmp_path, monkeypatch):
    """`read_tensors` (the loader's rules, what calibration reads each layer with): one decoder layer of a sharded
    checkpoint comes from the shards that hold it, in the dtype asked for; the rest of the model stays on meta."""
    from qopt.io.checkpoint import inspect_checkpoint
    from qopt.loading import loader
    from qopt.loading.saving import save_model
    from qopt.place.sizes import meta_model

    save_model(qopt.load(tiny_checkpoint, torch_dtype=torch.float16), tmp_path / "sharded", "40KB")
    files = inspect_checkpoint(tmp_path / "sharded")
    holding = sorted({info.file for name, info in files.tensors.items() if ".layers.1." in name})
    assert 1 < len(files.shards) and len(holding) < len(files.shards)
    opened, original = [], loader.iter_shard_tensors
    monkeypatch.setattr(loader, "iter_shard_tensors", lambda f, shard, *a, **k: opened.append(shard) or
                        original(f, shard, *a, **k))
    model = meta_model(qopt.OPTConfig.from_pretrained(tmp_path / "sharded"), None)
    loader.read_tensors(model, files, lambda n: n.startswith("model.decoder.layers.1."), torch.float32)
    assert opened == holding
    real = {n: p.dtype for n, p in model.named_parameters() if p.device.type != "meta"}
    assert real and all(n.startswith("model.decoder.layers.1.") for n in real)
    assert set(real.values()) == {torch.float32} and len(real) == len(list(model.model.decoder.layers[1].parameters()))


def test_save_after_a_forward_writes_the_calibrated_bytes_unchanged(tiny_checkpoint, windows, tmp_path):
    model, _ = calibrate(tiny_checkpoint, windows, CalibrationConfig(quantization="nf4-dq"), progress=False)
    model.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        model(torch.randint(3, 1000, (1, 8)))  # the CPU kernel repacks the 4-bit weights here
    model.save_pretrained(tmp_path / "after")
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == \
        (tmp_path / "after" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "int8"])
def test_calibrated_checkpoint_loads_in_plain_bitsandbytes_and_transformers(tiny_checkpoint, windows, tmp_path,
                                                                             name):
    import transformers

    model, _ = calibrate(tiny_checkpoint, windows, CalibrationConfig(quantization=name), progress=False)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits.float()
    model.save_pretrained(tmp_path / "cal")
    config = json.loads((tmp_path / "cal" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] == (name == "int8")
    peer = transformers.OPTForCausalLM.from_pretrained(tmp_path / "cal")
    assert type(peer.model.decoder.layers[0].fc1) is (bnb.nn.Linear8bitLt if name == "int8" else bnb.nn.Linear4bit)
    with torch.no_grad():
        assert torch.equal(peer(ids).logits.float(), ours)
    # a plain bitsandbytes module built from the saved tensors computes what qopt's module computes
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "cal" / "model.safetensors")
    prefix = "model.decoder.layers.1.fc2."
    tensors = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    if name == "int8":
        plain = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0).cpu()  # quantized once
        plain.load_state_dict(tensors)  # then the saved int8 rows and SCB replace its own
    else:
        plain = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16)
        plain.weight = bnb.nn.Params4bit.from_prequantized(
            tensors.pop("weight"), {k.removeprefix("weight."): v for k, v in tensors.items() if k != "bias"},
            device="cpu", module=plain)
        plain.bias = torch.nn.Parameter(tensors["bias"])
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.model.decoder.layers[1].fc2(x))
    loaded = qopt.load(tmp_path / "cal", torch_dtype="auto")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits.float(), ours)


def test_post_layer_norm_projected_model_keeps_its_projections_16bit(hf_checkpoint, windows, tmp_path):
    """OPT-350M's layout: post-LN layers and project_in / project_out, which stay 16-bit as in GPTQ."""
    import transformers

    folder, _ = hf_checkpoint(**VARIANTS["post_ln_proj"])
    model, _ = calibrate(folder, windows, progress=False)
    assert type(model.model.decoder.project_in) is torch.nn.Linear
    assert isinstance(model.model.decoder.layers[0].fc1, bnb.nn.Linear4bit)
    model.save_pretrained(tmp_path / "proj")
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(4))
    peer = transformers.OPTForCausalLM.from_pretrained(tmp_path / "proj")
    with torch.no_grad():
        ours = model(ids).logits.float()
        assert torch.equal(peer(ids).logits.float(), ours)
        assert torch.equal(qopt.load(tmp_path / "proj", torch_dtype="auto")(ids).logits.float(), ours)


# -- sensitivity and mixed precision --------------------------------------------------------------------------
def test_sensitivity_finds_the_layer_made_fragile(tiny_checkpoint, windows):
    model = qopt.load(tiny_checkpoint)
    fragile = "model.decoder.layers.1.fc1"
    with torch.no_grad():
        weight = model.get_submodule(fragile).weight
        weight[:, :8] *= 20  # big input columns: 4-bit rounding of this layer moves the output most
    ranking = layer_sensitivity(model, windows, "nf4", progress=False)
    assert [s.name for s in ranking] == decoder_linear_names(model)
    assert max(ranking, key=lambda s: s.kl).name == fragile
    assert max(ranking, key=lambda s: s.output_error).name == fragile
    cheap = layer_sensitivity(model, windows, "nf4", metric="output", progress=False)
    assert [s.output_error for s in cheap] == [s.output_error for s in ranking] and cheap[0].kl is None
    assert torch.equal(model.get_submodule(fragile).weight, weight)  # restored


def _synthetic(model, scores):
    return [Sensitivity(name, model.get_submodule(name).weight.numel(), output_error=0.0, kl=score)
            for name, score in zip(decoder_linear_names(model), scores, strict=True)]


@pytest.mark.parametrize("high_bits", [8, 16])
def test_mixed_precision_under_a_budget_keeps_the_most_sensitive(tiny_checkpoint, high_bits):
    model = qopt.load(tiny_checkpoint)
    names = decoder_linear_names(model)
    scores = [0.1 * (i % 5) + 0.01 * i for i in range(len(names))]
    ranked = [n for _, n in sorted(zip(scores, names, strict=True), reverse=True)]
    base = QuantizationConfig.from_name("nf4")
    all4 = model_bytes(model.config, base)
    exact = model_bytes(model.config, mixed_precision(base, {n: high_bits for n in ranked[:3]}))
    plan = choose_precision(model, _synthetic(model, scores), exact, base, high_bits)
    assert plan.promoted() == sorted(ranked[:3])
    assert plan.total_bytes == exact and plan.all_4bit_bytes == all4
    assert choose_precision(model, _synthetic(model, scores), all4, base, high_bits).promoted() == []
    with pytest.raises(PlanError, match="below the all-4-bit"):
        choose_precision(model, _synthetic(model, scores), all4 - 1, base, high_bits)


def calibrated_mixed(checkpoint, windows, base: str, module_bits: dict[str, int], out):
    """Calibrate with some linears at other widths, save to `out`; (model, the saved quantization_config)."""
    quant = mixed_precision(QuantizationConfig.from_name(base), module_bits)
    model, _ = calibrate(checkpoint, windows, CalibrationConfig(quantization=quant), progress=False)
    model.save_pretrained(out)
    return model, json.loads((out / "config.json").read_text())["quantization_config"]


def test_mixed_4_and_16_bit_checkpoint_loads_in_transformers_and_qopt(tiny_checkpoint, windows, tmp_path):
    import transformers

    keep = {"model.decoder.layers.0.fc2": 16, "model.decoder.layers.1.self_attn.v_proj": 16}
    model, saved = calibrated_mixed(tiny_checkpoint, windows, "nf4", keep, tmp_path / "mixed")
    assert type(model.get_submodule("model.decoder.layers.0.fc2")) is torch.nn.Linear
    assert set(saved["llm_int8_skip_modules"]) == set(keep) | {"lm_head"}
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    peer = transformers.OPTForCausalLM.from_pretrained(tmp_path / "mixed")
    assert type(peer.model.decoder.layers[0].fc2) is torch.nn.Linear
    assert type(peer.model.decoder.layers[0].fc1) is bnb.nn.Linear4bit
    with torch.no_grad():
        ours = model(ids).logits.float()
        assert torch.equal(peer(ids).logits.float(), ours)
        assert torch.equal(qopt.load(tmp_path / "mixed", torch_dtype="auto")(ids).logits.float(), ours)


def test_mixed_4_and_8_bit_checkpoint_round_trips_in_qopt(tiny_checkpoint, windows, tmp_path):
    promote = {"model.decoder.layers.0.fc1": 8, "model.decoder.layers.1.self_attn.q_proj": 8}
    model, saved = calibrated_mixed(tiny_checkpoint, windows, "nf4-dq", promote, tmp_path / "mixed8")
    assert type(model.get_submodule("model.decoder.layers.0.fc1")) is bnb.nn.Linear8bitLt
    assert saved["qopt_module_bits"] == promote
    loaded = qopt.load(tmp_path / "mixed8", torch_dtype="auto")
    assert type(loaded.get_submodule("model.decoder.layers.0.fc1")) is bnb.nn.Linear8bitLt
    assert isinstance(loaded.get_submodule("model.decoder.layers.0.fc2"), bnb.nn.Linear4bit)
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- calibration data -----------------------------------------------------------------------------------------
def test_calibration_windows_are_seeded_and_never_from_the_test_split():
    a = calibration_windows(count=4, seqlen=64, seed=3)
    assert a.shape == (4, 64) and torch.equal(a, calibration_windows(count=4, seqlen=64, seed=3))
    assert not torch.equal(a, calibration_windows(count=4, seqlen=64, seed=4))
    from qopt.bundled import wikitext2_test_path

    sample = cal.default_calibration_sample().read_text(encoding="utf-8")
    assert len(sample.encode("utf-8")) <= 300_000
    test_text = wikitext2_test_path().read_text(encoding="utf-8")
    excerpts = [p.strip() for p in sample.split("\n\n") if len(p.strip()) > 80]
    assert len(excerpts) > 50
    assert not any(p[:80] in test_text for p in excerpts)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows("too short", count=1, seqlen=64)


def test_cli_quantize_calibrated_and_rtn_under_a_budget(hf_checkpoint, tmp_path, capsys):
    from qopt.cli import main

    folder, _ = hf_checkpoint(vocab_size=50272)  # the shipped sample is tokenized with OPT's vocabulary
    model = qopt.load(folder)
    base = QuantizationConfig.from_name("nf4")
    budget = model_bytes(model.config, base) + 6000  # room for about one linear in 8-bit
    window_args = ["--calibration-windows", "4", "--calibration-seqlen", "32"]
    # defaults: 128 windows of the model's context (64 here) from the shipped sample
    assert main(["quantize", str(folder), "--method", "calibrated", "--out", str(tmp_path / "cal")]) == 0
    assert "on 128 windows of 64 tokens" in capsys.readouterr().out
    for method in ("calibrated", "rtn"):
        out = tmp_path / f"{method}-mixed"
        assert main(["quantize", str(folder), "--method", method, "--budget", f"{budget}B", "--out", str(out),
                     *window_args]) == 0
        assert "linears in 8-bit" in capsys.readouterr().out
        promoted = json.loads((out / "config.json").read_text())["quantization_config"]["qopt_module_bits"]
        assert promoted and set(promoted.values()) == {8}
        loaded = qopt.load(out, torch_dtype="auto")
        assert all(type(loaded.get_submodule(n)) is bnb.nn.Linear8bitLt for n in promoted)
    assert main(["quantize", str(folder), "--method", "calibrated", "--budget", "1KB", "--out",
                 str(tmp_path / "none"), *window_args]) == 2
    assert "below the all-4-bit" in capsys.readouterr().err
