"""Quantization: byte-exact fast quantizers, the config's HF form, module swap, standard saved layout, dequant."""
import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import qopt
from qopt.errors import CheckpointError, ConfigError
from qopt.quant import quantizers as kernels
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import (
    config_of,
    dequantize_weight,
    is_quantized,
    linear_from_quantized,
    quantize_linear,
    quantize_model,
    quantized_state,
)

PRESETS = ["int8", "nf4", "fp4", "nf4-dq", "fp4-dq"]
# max |logit error| / max |logit| of a quantized tiny random model against its float original (measured:
# int8 ~0.01, nf4 ~0.11, fp4 ~0.16); random weights are the worst case for 4-bit (no outlier structure)
REL_TOLERANCE = {"int8": 0.03, "nf4": 0.2, "fp4": 0.25, "nf4-dq": 0.2, "fp4-dq": 0.25}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


# -- the fast quantizer writes bitsandbytes' bytes ----------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("shape", [(256, 96), (130, 96), (5, 7), (3, 64), (1, 1)])
def test_quantize_4bit_bytes_equal_bitsandbytes(quant_type, double, shape):
    torch.manual_seed(0)
    source = torch.randn(shape, dtype=torch.float16) * 0.05
    source.view(-1)[0] = float("nan") if source.numel() > 64 else source.view(-1)[0]
    if shape[0] > 4:
        source[2] = 0  # all-zero blocks (absmax 0)
        source[3, :3] = torch.tensor([1e4, -1e-6, 6e-8])  # extremes inside one block
    kept = source.clone()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ours, ours_state = kernels.quantize_4bit(source, quant_type, 64, double, dtype=dtype)
        ref, ref_state = bnb.functional.quantize_4bit(source.to(dtype), quant_type=quant_type,
                                                      compress_statistics=double)
        assert same_bytes(ours, ref), (dtype, "codes")
        assert same_state(ours_state.as_dict(packed=True), ref_state.as_dict(packed=True)), dtype
    assert same_bytes(source, kept)  # the input is never scaled in place


def test_quantize_4bit_threads_and_many_chunks_equal_bitsandbytes(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 1024)  # 40 chunks shared by two threads
    monkeypatch.setattr(kernels, "_threads", lambda: 2)
    source = torch.randn(320, 128, dtype=torch.bfloat16)
    ours, state = kernels.quantize_4bit(source, "nf4")
    ref, ref_state = bnb.functional.quantize_4bit(source, quant_type="nf4")
    assert same_bytes(ours, ref) and same_bytes(state.absmax, ref_state.absmax)


def test_int8_rows_equal_int8params():
    source = torch.randn(300, 80, dtype=torch.bfloat16)
    codes, scales = kernels.quantize_int8_rows(source, rows_per_step=64)
    param = bnb.nn.Int8Params(source.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert same_bytes(codes, param.CB) and same_bytes(scales, param.SCB)


# -- the config is transformers' BitsAndBytesConfig -------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_config_dict_equals_transformers(name):
    from transformers import BitsAndBytesConfig

    ours = QuantizationConfig.from_name(name)
    peer = BitsAndBytesConfig(load_in_8bit=ours.load_in_8bit, load_in_4bit=ours.load_in_4bit,
                              bnb_4bit_quant_type=ours.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=ours.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    assert ours.to_dict() == peer.to_dict()
    assert QuantizationConfig.from_dict(peer.to_dict()) == ours
    assert QuantizationConfig.coerce(peer) == ours
    assert ours.bits == (8 if name == "int8" else 4) and ours.name == name


def test_from_bits_is_the_preset_of_a_width():
    """What the planners build from --bits / --quant-type / --double-quant."""
    assert QuantizationConfig.from_bits(16) is None
    assert QuantizationConfig.from_bits(8) == QuantizationConfig.from_name("int8")
    assert QuantizationConfig.from_bits(4, "fp4", double_quant=True) == QuantizationConfig.from_name("fp4-dq")
    assert QuantizationConfig.from_bits(4, compute_dtype=torch.float16).bnb_4bit_compute_dtype == torch.float16
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16, got 3"):
        QuantizationConfig.from_bits(3)


def test_config_keeps_unknown_and_mixed_precision_keys():
    data = {**QuantizationConfig.from_name("nf4").to_dict(), "qopt_module_bits": {"model.decoder.layers.0.fc1": 8},
            "qopt_method": "gptq"}
    config = QuantizationConfig.from_dict(data)
    assert config.to_dict() == data
    assert config.bits_for("model.decoder.layers.0.fc1") == 8 and config.bits_for("model.decoder.layers.1.fc1") == 4
    assert config.bits_for("lm_head") == 16


@pytest.mark.parametrize("data, field", [({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit"),
                                         ({}, "load_in_4bit"),
                                         ({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type"),
                                         ({"load_in_4bit": True, "quant_method": "gptq"}, "quant_method"),
                                         ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float7"}, "compute_dtype"),
                                         ({"load_in_8bit": True, "qopt_module_bits": {"fc1": 3}}, "qopt_module_bits")])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        QuantizationConfig.from_dict(data, source="x/config.json")
    with pytest.raises(ConfigError, match="expected one of"):
        QuantizationConfig.from_name("int3")


def test_skip_modules_follow_transformers_matching():
    config = QuantizationConfig(load_in_4bit=True, llm_int8_skip_modules=["fc2", "model.decoder.layers.1"])
    assert config.bits_for("model.decoder.layers.0.fc2") == 16  # suffix
    assert config.bits_for("model.decoder.layers.1.self_attn.q_proj") == 16  # prefix up to a module boundary
    assert config.bits_for("model.decoder.layers.11.self_attn.q_proj") == 4  # not "layers.1" + "1"
    assert config.bits_for("score") == 16 and config.bits_for("qa_outputs") == 16


# -- swapping an in-memory model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from tests.conftest import make_hf_model

    folder = tmp_path_factory.mktemp("float") / "ckpt"
    make_hf_model(peaky=3.0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", PRESETS)
def test_quantize_model_logits_close_and_state_stable_across_forward(float_model, name):
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = qopt.load(float_model, progress=False)
    model = quantize_model(qopt.load(float_model, progress=False), name)
    assert model.config.quantization_config == QuantizationConfig.from_name(name).to_dict()
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.decoder.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert (got - expected).abs().max() <= REL_TOLERANCE[name] * expected.abs().max()
    assert same_state(before, model.state_dict())  # CPU repack happened, the saved form did not change
    layer = model.model.decoder.layers[0].fc1
    if name != "int8":
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("name", PRESETS)
def test_dequantize_weight_in_any_state(name):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(torch.bfloat16).eval()
    module = quantize_linear(linear, QuantizationConfig.from_name(name))
    assert is_quantized(module) and config_of(module).name == name
    before = dequantize_weight(module)
    if name == "int8":  # codes x row scale / 127 (bitsandbytes multiplies by a rounded 1/127)
        assert torch.allclose(before, module.weight.data.float() * module.weight.SCB[:, None] / 127, rtol=1e-6)
    else:
        expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(before.float(), expected.float())
    assert (before.float() - linear.weight.float()).abs().max() < 0.25 * linear.weight.abs().max()
    with torch.no_grad():
        module(torch.randn(3, 128, dtype=torch.bfloat16))  # repacks 4-bit for the CPU kernel
    assert torch.equal(dequantize_weight(module).float(), before.float())


@pytest.mark.parametrize("name", ["int8", "nf4-dq"])
def test_linear_from_quantized_round_trips_the_saved_layout(name):
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    module = quantize_linear(linear, QuantizationConfig.from_name(name)).eval()
    with torch.no_grad():
        module(torch.randn(2, 64, dtype=torch.bfloat16))
    state = quantized_state(module)
    rebuilt = linear_from_quantized(state, QuantizationConfig.from_name(name))
    assert same_state(quantized_state(rebuilt), state)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), module(x))


def test_linear_from_quantized_rejects_incomplete_statistics():
    module = quantize_linear(nn.Linear(64, 32), QuantizationConfig.from_name("nf4"))
    state = quantized_state(module)
    del state["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(CheckpointError, match="4-bit statistics"):
        linear_from_quantized(state, QuantizationConfig.from_name("nf4"), source="layers.0.fc1")
    state = quantized_state(module)
    state["weight"] = state["weight"][:-1]
    with pytest.raises(CheckpointError, match="layers.0.fc1"):
        linear_from_quantized(state, QuantizationConfig.from_name("nf4"), source="layers.0.fc1")
