"""`--budget` mixed precision: feasibility before any read, the streamed sensitivity pass, the CLI's window knob,
mixed checkpoints labelled as such."""
import json

import pytest
import torch

import qopt
from qopt.calibration import layerwise as cal
from qopt.calibration import sensitivity as sens
from qopt.calibration.layerwise import SEQUENTIAL_GROUPS, grid_for_bits, mixed_precision, rtn_dequantized
from qopt.calibration.sensitivity import (
    check_budget,
    decoder_linear_names,
    model_bytes,
    plan_for_checkpoint,
    streamed_sensitivity,
)
from qopt.cli import main
from qopt.errors import PlanError
from qopt.evaluation.compare import stored_precision
from qopt.io import checkpoint as shards
from qopt.loading import loader
from qopt.model.network import build_attention_mask
from qopt.quant.config import QuantizationConfig
from qopt.utils import format_bytes

NF4 = QuantizationConfig.from_name("nf4")


def write_model(folder, fragile: str | None = None):
    """A small qopt checkpoint with OPT's vocabulary (the shipped calibration sample and WikiText-2 tokenize into
    it); `fragile` gets big input columns, so 4-bit rounding of that linear moves its layer's output most."""
    torch.manual_seed(0)
    config = qopt.OPTConfig(vocab_size=50272, hidden_size=64, num_hidden_layers=3, ffn_dim=128,
                            num_attention_heads=4, max_position_embeddings=32, dropout=0.0)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    if fragile:
        with torch.no_grad():
            model.get_submodule(fragile).weight[:, :8] *= 20
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("budget") / "model")


@pytest.fixture
def windows():
    return torch.randint(3, 1000, (6, 24), generator=torch.Generator().manual_seed(0))


def sizes(folder, high_bits: int = 8) -> tuple[int, int]:
    config = qopt.OPTConfig.from_pretrained(folder)
    return model_bytes(config, NF4), model_bytes(config, mixed_precision(
        NF4, dict.fromkeys(decoder_linear_names(config), high_bits)))


# -- feasibility ----------------------------------------------------------------------------------------------
def no_reads(monkeypatch):
    """Make every way to a weight (and the calibration text) fail, so a test sees whether work started."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the budget was checked")

    for module, name in ((loader, "iter_shard_tensors"), (cal, "inspect_checkpoint"), (sens, "calibration_windows"),
                         (sens, "streamed_sensitivity"), (shards, "iter_shard_tensors")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("high_bits", [8, 16])
def test_a_budget_with_nothing_to_choose_fails_before_any_read(checkpoint, monkeypatch, high_bits):
    all4, all_high = sizes(checkpoint, high_bits)
    no_reads(monkeypatch)
    with pytest.raises(PlanError, match=rf"below the all-4-bit \(nf4\) model's .*\({all4:,} bytes\)") as err:
        plan_for_checkpoint(checkpoint, all4 - 1, NF4, high_bits)
    assert f"budget {format_bytes(all4 - 1)} ({all4 - 1:,} bytes)" in str(err.value)
    with pytest.raises(PlanError, match=rf"every decoder linear in {high_bits}-bit .*\({all_high:,} bytes\).*"
                                        "no choice to make"):
        plan_for_checkpoint(checkpoint, all_high, NF4, high_bits)
    assert check_budget(qopt.OPTConfig.from_pretrained(checkpoint), all_high - 1, NF4, high_bits) == (all4, all_high)


def test_cli_reports_an_impossible_budget_in_one_line_before_any_read(checkpoint, monkeypatch, tmp_path, capsys):
    no_reads(monkeypatch)
    out = tmp_path / "out"
    assert main(["quantize", str(checkpoint), "--bits", "4", "--budget", "10KB", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget 9.8 KiB (10,000 bytes) is below the all-4-bit" in err
    assert not out.exists()


# -- the streamed pass ----------------------------------------------------------------------------------------
@torch.no_grad()
def reference_layer_errors(folder, windows) -> dict[str, float]:
    """The per-layer metric computed directly on the whole float model in memory."""
    model = qopt.load(folder, torch_dtype=torch.float32, progress=False)
    decoder = model.model.decoder
    states = decoder(input_ids=windows, use_cache=False, output_hidden_states=True).hidden_states
    mask = build_attention_mask(torch.ones(1, windows.shape[1], dtype=torch.long), windows.shape[1], 0)
    grid = grid_for_bits(4, NF4)
    errors, hidden = {}, states[0]
    for i, layer in enumerate(decoder.layers):
        clean, scale = layer(hidden, mask)[0], float((hidden ** 2).mean())
        for name in sum(SEQUENTIAL_GROUPS, ()):
            linear = layer.get_submodule(name)
            weight = linear.weight.data
            linear.weight.data = rtn_dequantized(weight, grid)
            errors[f"model.decoder.layers.{i}.{name}"] = float(((layer(hidden, mask)[0] - clean) ** 2).mean()) / scale
            linear.weight.data = weight
        hidden = clean
        if i + 1 < len(decoder.layers):
            assert torch.allclose(hidden, states[i + 1].float(), atol=1e-5)  # the decoder's own layer inputs
    return errors


def test_streamed_pass_matches_the_in_memory_computation_one_float_layer_at_a_time(checkpoint, windows,
                                                                                    monkeypatch):
    float_layers, original = [], sens.read_tensors

    def spy(model, *rest):
        original(model, *rest)
        float_layers.append(sum(1 for layer in model.model.decoder.layers
                                if any(p.device.type != "meta" for p in layer.parameters())))

    monkeypatch.setattr(sens, "read_tensors", spy)
    ranking = streamed_sensitivity(checkpoint, windows, "nf4", batch_tokens=48, progress=False)  # 2 windows a batch
    assert float_layers == [1, 1, 1]
    expected = reference_layer_errors(checkpoint, windows)
    assert [s.name for s in ranking] == list(expected)
    for item in ranking:
        assert item.layer_error == pytest.approx(expected[item.name], rel=1e-4, abs=1e-9), item.name
        assert item.score("layer") == item.layer_error and item.kl is None and item.output_error is None
    assert len({round(s.layer_error, 12) for s in ranking}) == len(ranking) and min(expected.values()) > 0


def test_streamed_pass_finds_the_linear_made_fragile(tmp_path, windows):
    fragile = "model.decoder.layers.1.fc1"
    folder = write_model(tmp_path / "fragile", fragile)
    ranking = streamed_sensitivity(folder, windows, "nf4", progress=False)
    assert max(ranking, key=lambda s: s.layer_error).name == fragile


def test_budget_plan_promotes_the_most_sensitive_linears(tmp_path):
    fragile = "model.decoder.layers.2.self_attn.v_proj"
    folder = write_model(tmp_path / "fragile", fragile)
    all4, all8 = sizes(folder)
    budget = model_bytes(qopt.OPTConfig.from_pretrained(folder), mixed_precision(NF4, {fragile: 8}))  # room for one
    plan = plan_for_checkpoint(folder, budget, NF4, 8, sample=4, seqlen=24, progress=False)
    assert plan.promoted() == [fragile] and plan.total_bytes == budget
    assert (plan.all_4bit_bytes, plan.all_high_bytes) == (all4, all8)


# -- the command line -----------------------------------------------------------------------------------------
def test_cli_honours_the_sensitivity_window_knob(checkpoint, monkeypatch, tmp_path, capsys):
    seen, original = [], sens.streamed_sensitivity

    def spy(path, windows, *args, **kwargs):
        seen.append(tuple(windows.shape))
        return original(path, windows, *args, **kwargs)

    monkeypatch.setattr(sens, "streamed_sensitivity", spy)
    all4, _ = sizes(checkpoint)
    common = ["quantize", str(checkpoint), "--bits", "4", "--budget", f"{all4 + 6000}B", "--calibration-seqlen",
              "16"]
    assert main([*common, "--sensitivity-windows", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert seen == [(3, 16), (16, 16)]  # the knob, then its default
    assert "linears in 8-bit" in capsys.readouterr().out
    promoted = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["qopt_module_bits"]
    assert promoted and set(promoted.values()) == {8}
    assert main([*common, "--sensitivity-windows", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--sensitivity-windows must be at least 1" in capsys.readouterr().err


# -- labels ---------------------------------------------------------------------------------------------------
def test_mixed_configs_are_labelled_mixed_and_single_width_names_are_unchanged():
    for preset in ("int8", "nf4", "fp4", "nf4-dq", "fp4-dq"):
        config = QuantizationConfig.from_name(preset)
        assert config.name == config.label == preset and config.mixed_widths == []
    layer = "model.decoder.layers.0.fc1"
    assert mixed_precision(NF4, {layer: 8}).label == "nf4+int8 mixed"
    assert mixed_precision(NF4, {layer: 8}).name == "nf4"  # still loads as its base preset
    both = mixed_precision(QuantizationConfig.from_name("nf4-dq"), {layer: 8, "model.decoder.layers.1.fc2": 16})
    assert both.label == "nf4-dq+int8+16-bit mixed" and both.mixed_widths == [8, 16]
    outside = mixed_precision(NF4, {"model.decoder.project_in": 16, "model.decoder.project_out": 16})
    assert outside.label == "nf4"  # OPT-350M's 16-bit projections do not make a model mixed
    assert QuantizationConfig.from_dict({**NF4.to_dict(), "llm_int8_skip_modules": [layer]}).label == \
        "nf4+16-bit mixed"


def test_eval_labels_a_mixed_checkpoint_as_mixed(checkpoint, tmp_path, capsys):
    promote = {"model.decoder.layers.0.fc1": 8, "model.decoder.layers.1.self_attn.v_proj": 8}
    model = qopt.load(checkpoint, quantization=mixed_precision(NF4, promote), torch_dtype=torch.bfloat16,
                      progress=False)
    model.save_pretrained(tmp_path / "mixed")
    assert stored_precision(tmp_path / "mixed") == "nf4+int8 mixed"
    assert main(["eval", str(tmp_path / "mixed"), "--windows", "1"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| nf4"))
    assert row.startswith("| nf4+int8 mixed |") and "| nf4 |" not in table
    linear_bits = float(row.split("|")[8])
    assert 4 < linear_bits < 8  # the bits/param column says what the mix costs
