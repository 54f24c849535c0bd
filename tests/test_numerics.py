"""find_nonfinite / check_finite name the first module whose output (or input) holds NaN or inf."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import qopt
from qopt import NumericsError, OPTConfig, OPTForCausalLM
from qopt.model.numerics import check_finite, find_nonfinite
from tests.conftest import TINY


@pytest.fixture
def model() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**TINY)).eval()


IDS = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_finite_model_passes_and_returns_the_plain_output(model):
    with torch.no_grad():
        want = model(IDS).logits
    assert torch.equal(find_nonfinite(model, IDS).logits, want)
    assert hook_count(model) == 0


def test_float16_overflow_names_the_layer_and_dtype(model):
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.weight.fill_(1e4)  # finite in fp16, but the sum overflows 65504
    assert torch.isfinite(find_nonfinite(model, IDS).logits).all()  # fine in float32
    model.half()
    with torch.no_grad():
        assert not torch.isfinite(model(IDS).logits).all()  # the plain forward just returns garbage
    with pytest.raises(NumericsError) as info:
        find_nonfinite(model, IDS)
    message = str(info.value)
    assert message.startswith("model.decoder.layers.1.fc2 (Linear) produced inf in float16")
    assert "65504" in message and "bfloat16 or float32" in message
    assert hook_count(model) == 0  # hooks are removed when the check raises


def test_nan_weight_is_named_with_its_parameter(model):
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn_layer_norm.weight[5] = float("nan")
    with pytest.raises(NumericsError, match=r"^model\.decoder\.layers\.0\.self_attn_layer_norm \(LayerNorm\) "
                                            r"produced NaN in float32 \(16 of 1024 values\).*parameter\(s\) weight"):
        find_nonfinite(model, IDS)


def test_nan_in_a_loaded_checkpoint(tmp_path, model):
    with torch.no_grad():
        model.model.decoder.layers[1].self_attn.v_proj.bias[0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    loaded = qopt.load(tmp_path / "m", torch_dtype="bfloat16", progress=False)
    with pytest.raises(NumericsError, match=r"^model\.decoder\.layers\.1\.self_attn\.v_proj .*bias are not finite"):
        find_nonfinite(loaded, IDS)


def test_non_finite_input_is_reported_as_input(model):
    embeds = torch.zeros(1, 4, TINY["hidden_size"])
    embeds[0, 2, 7] = float("inf")
    with pytest.raises(NumericsError, match=r"^inf in float32 \(1 of 256 values\) appeared in the input of "
                                            r"OPTForCausalLM"):
        find_nonfinite(model, inputs_embeds=embeds)


class Scaled(nn.Module):
    """A parent whose own code (not a submodule) overflows between two submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x) * 1e39)


def test_overflow_in_a_parents_own_code_names_the_parent():
    model = nn.Sequential(nn.Linear(4, 4), Scaled())
    with pytest.raises(NumericsError, match=r"^inf in float32 .* inside 1 \(Scaled\), before it called 1\.second"):
        find_nonfinite(model, torch.ones(2, 4))


def test_check_finite_spans_several_forwards_with_a_cache(model):
    with check_finite(model), torch.no_grad():
        out = model(IDS[:, :5], use_cache=True)
        model(IDS[:, 5:6], past_key_values=out.past_key_values, use_cache=True)
        model.lm_head.weight[3, 0] = float("nan")  # tied to embed_tokens: token 3's embedding is now NaN
        with pytest.raises(NumericsError, match=r"^model\.decoder\.embed_tokens \(Embedding\) produced NaN"):
            model(torch.full((2, 1), 3), past_key_values=out.past_key_values, use_cache=True)
    assert hook_count(model) == 0


def test_quantized_modules_are_checked_without_false_alarms():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu").eval()
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(find_nonfinite(model, x), model(x))
    with pytest.raises(NumericsError, match=r"^inf in bfloat16 .* appeared in the input of Sequential"):
        find_nonfinite(model, x * float("inf"))
