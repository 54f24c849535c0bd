"""`qopt merge` / `qopt.merge_and_unload(measure=True)`: merged models, and what they keep of an adapter's gain."""
import math
import warnings

import pytest
import torch

import qopt
from qopt.cli.main import main
from qopt.evaluation.merge_quality import MergeQuality, merge_adapter
from qopt.evaluation.perplexity import text_ids
from qopt.finetuning.data import LMBlocks
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.finetuning.merge import merge_into_float, training_quantization
from qopt.finetuning.recipe import prepare_for_kbit_training
from qopt.finetuning.trainer import TrainingArguments, train
from tests.conftest import save_random_opt

WINDOWS = 6  # WikiText-2 windows of 64 tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random OPT with the real vocabulary, context 64, saved in bf16."""
    folder = save_random_opt(tmp_path_factory.mktemp("merge") / "base", peaky=10, dtype=torch.bfloat16,
                             ffn_dim=256)
    return folder


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A QLoRA adapter trained 40 steps on WikiText-2 text, so it has a gain to keep (or lose)."""
    model = qopt.load(base, quantization="nf4", torch_dtype=None, progress=False)
    prepare_for_kbit_training(model)
    add_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ids = text_ids()[: 64 * 200].view(200, 64)
    out = tmp_path_factory.mktemp("merge") / "adapter"
    train(model, LMBlocks(ids), None, TrainingArguments(str(out), max_steps=40, batch_size=8, learning_rate=1e-2,
                                                        progress=False))
    return out


def test_the_adapter_folder_says_what_base_it_was_trained_on(adapter, tmp_path):
    assert training_quantization(adapter) is None  # train() without the recipe records no quantization
    assert training_quantization(tmp_path) is None


def test_a_16_bit_merge_keeps_the_adapter_logits(base, adapter, tmp_path):
    result = merge_adapter(base, adapter, tmp_path / "m16", bits=16, dtype=torch.float32,
                           base_quantization="nf4", windows=WINDOWS, progress=False)
    merged = qopt.load(tmp_path / "m16", progress=False)
    assert merged.config.quantization_config is None and merged.dtype == torch.float32
    # the unmerged model computing in fp32: the same function, summed in another order
    fp32 = qopt.QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    unmerged = qopt.load(base, quantization=fp32, torch_dtype=None, progress=False)
    qopt.load_adapter(unmerged, adapter)
    ids = text_ids()[:64][None]
    with torch.no_grad():
        expected, got = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())
    q = result.quality
    assert q.gain > 0.1, q.summary()  # the adapter helps on WikiText-2
    assert abs(q.lost_fraction) < 0.02 and q.kl < 1e-3, q.summary()


def test_a_4_bit_merge_reports_the_share_of_the_gain_it_lost(base, adapter, tmp_path, capsys):
    result = merge_adapter(base, adapter, tmp_path / "m4", bits=4, base_quantization="nf4", windows=WINDOWS,
                           progress=False)
    q = result.quality
    assert 0.0 <= q.lost_fraction <= 1.05, q.summary()
    assert q.kl > 0 and math.isclose(q.lost_fraction, (q.merged_nll - q.adapter_nll) / q.gain)
    assert qopt.load(tmp_path / "m4", progress=False).config.quantization_config["load_in_4bit"]
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "m8"), "--bits", "8",
                 "--base-quantization", "nf4", "--windows", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "merged into a 8-bit rtn model (nf4 base)" in out and "of the adapter's gain lost" in out
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "m8"), "--bits", "16",
                 "--method", "calibrated"]) == 2  # one line: nothing to calibrate at 16 bits
    assert "nothing to calibrate" in capsys.readouterr().err


def test_in_place_merge_measures_and_warns_when_most_of_the_gain_is_lost(base, adapter):
    model = qopt.load(base, quantization="nf4", torch_dtype=None, progress=False)
    qopt.load_adapter(model, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = qopt.merge_and_unload(model, measure=True, windows=WINDOWS)
    q = report.quality
    assert q is not None and q.gain > 0 and "of the adapter's gain lost" in report.summary()
    warned = [w for w in caught if "merge at 16 bits" in str(w.message)]
    assert bool(warned) == (q.lost_fraction > 0.5), q.summary()


def test_merge_quality_arithmetic_and_the_float_merge_of_a_plain_model():
    q = MergeQuality(base_nll=5.0, adapter_nll=4.0, merged_nll=4.8)
    assert math.isclose(q.lost_fraction, 0.8) and "merge at 16 bits" in q.warning()
    assert MergeQuality(5.0, 4.0, 4.2).warning() is None
    assert math.isnan(MergeQuality(5.0, 5.1, 5.2).lost_fraction)  # no gain to lose
    model = qopt.OPTForCausalLM(qopt.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                               num_attention_heads=2, max_position_embeddings=16)).eval()
    model.init_weights()
    with pytest.raises(qopt.AdapterError, match="no LoRA adapters"):
        merge_into_float(model)
    add_lora(model, LoraConfig(r=2, init_lora_weights=False))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        report = merge_into_float(model)
        after = model(input_ids=ids).logits
    assert report.worst_abs_error == 0 and torch.allclose(before, after, atol=1e-5)
