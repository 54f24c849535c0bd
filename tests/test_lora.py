"""LoRA layers, PEFT-format adapter files (both directions against peft itself), switching, unloading, merging."""
import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

import qopt
from qopt.errors import AdapterError
from qopt.finetuning.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from qopt.finetuning.lora import (
    LoraConfig,
    LoraLinear,
    ModulesToSave,
    add_lora,
    delete_adapter,
    disable_adapters,
    set_adapter,
    unload,
)
from qopt.finetuning.merge import merge_into_base
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import quantize_model

ATOL = 1e-5
CONFIGS = {  # qopt LoraConfig kwargs; the PEFT config of a case uses the same fields
    "causal_default": ("OPTForCausalLM", dict(r=4, lora_alpha=8)),
    "causal_all_linear_rslora_bias_all": ("OPTForCausalLM", dict(r=4, lora_alpha=16, target_modules="all-linear",
                                                                 use_rslora=True, bias="all", lora_dropout=0.1)),
    "seq_cls_saved_head_lora_only_bias": ("OPTForSequenceClassification",
                                          dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "fc2"],
                                               bias="lora_only", use_rslora=True)),
}


def ids_batch(seed=0, shape=(2, 9)):
    return torch.randint(3, 1000, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def train_a_little(model, steps=3, lr=1e-2):
    """A few real optimizer steps, so B, trained biases and saved heads all move away from their init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        ids = ids_batch(100 + step)
        labels = ids if isinstance(model, qopt.OPTForCausalLM) else torch.tensor([0, 1])
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def peft_config(kwargs, cls_name, **extra):
    import peft

    task = "CAUSAL_LM" if cls_name == "OPTForCausalLM" else "SEQ_CLS"
    return peft.LoraConfig(task_type=task, **kwargs, **extra)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_adapter_trained_here_gives_same_logits_in_peft(hf_checkpoint, tmp_path, case):
    from peft import PeftModel

    cls_name, kwargs = CONFIGS[case]
    folder, hf = hf_checkpoint(cls_name)
    ours = getattr(qopt, cls_name).from_pretrained(folder)
    ids = ids_batch()
    base = logits(ours, ids)
    torch.manual_seed(0)
    add_lora(ours, LoraConfig(**kwargs))
    train_a_little(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    expected = logits(ours, ids)
    assert (expected - base).abs().max().item() > 1e-3  # training moved the output
    assert (logits(peft_model, ids) - expected).abs().max().item() < ATOL
    with disable_adapters(ours):  # the untouched base, trained biases included (PEFT only warns about those)
        assert torch.equal(logits(ours, ids), base)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_adapter_made_by_peft_gives_same_logits_here(hf_checkpoint, tmp_path, case):
    from peft import get_peft_model

    cls_name, kwargs = CONFIGS[case]
    folder, hf = hf_checkpoint(cls_name)
    torch.manual_seed(0)
    peft_model = get_peft_model(hf, peft_config(kwargs, cls_name, init_lora_weights=False))
    with torch.no_grad():  # move what the adapter trains besides A and B: biases and the saved head
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = getattr(qopt, cls_name).from_pretrained(folder)
    base = logits(ours, ids_batch())
    load_adapter(ours, tmp_path / "adapter")
    expected = logits(peft_model, ids_batch())
    assert (expected - base).abs().max().item() > 1e-3  # the adapter changes the output
    assert (logits(ours, ids_batch()) - expected).abs().max().item() < ATOL


def test_saved_files_use_peft_key_names_and_config_fields(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("OPTForSequenceClassification")
    model = qopt.OPTForSequenceClassification.from_pretrained(folder)
    model.name_or_path = "facebook/opt-tiny"
    add_lora(model, LoraConfig(r=2, bias="lora_only"))
    save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / ADAPTER_WEIGHTS))
    prefix = "base_model.model.model.decoder.layers"
    expected = {f"{prefix}.{i}.self_attn.{m}.{part}" for i in range(2) for m in ("q_proj", "v_proj")
                for part in ("lora_A.weight", "lora_B.weight", "base_layer.bias")} | {"base_model.model.score.weight"}
    assert keys == expected
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["inference_mode"] is True
    assert config["target_modules"] == ["q_proj", "v_proj"] and "score" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == "facebook/opt-tiny" and config["fan_in_fan_out"] is False


def test_base_is_frozen_and_only_the_active_adapter_trains(hf_checkpoint):
    folder, _ = hf_checkpoint()
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    add_lora(model, LoraConfig(r=4), "first")
    add_lora(model, LoraConfig(r=4, bias="all"), "second", activate=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".first." in n and "lora_" in n for n in trainable)
    set_adapter(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("final_layer_norm.bias") for n in trainable)
    assert not any(".first." in n for n in trainable) and not any(n.endswith(".weight") and "lora_" not in n
                                                                     for n in trainable)


def test_switch_disable_and_unload_restore_base_exactly(hf_checkpoint):
    folder, _ = hf_checkpoint()
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    ids = ids_batch()
    base, base_state = logits(model, ids), {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, bias="all", target_modules="all-linear"), "a")
    train_a_little(model)
    out_a = logits(model, ids)
    add_lora(model, LoraConfig(r=8, init_lora_weights=False), "b")
    out_b = logits(model, ids)
    assert (out_a - base).abs().max() > 1e-3 and (out_b - out_a).abs().max() > 1e-3
    set_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_a)  # a's trained biases came back with it
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    set_adapter(model, "b")
    assert torch.equal(logits(model, ids), out_b)
    delete_adapter(model, "b")
    assert model.lora_adapters.active is None and torch.equal(logits(model, ids), base)
    set_adapter(model, "a")
    unload(model)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert model.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), base)


def test_merge_into_full_precision_weights_is_exact(hf_checkpoint):
    folder, _ = hf_checkpoint()
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    ids = ids_batch()
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "fc1"]))
    layer = model.model.decoder.layers[1].fc1
    exact = layer.base_layer.weight.detach().clone() + layer.delta_weight("default")
    with_adapter = logits(model, ids)
    report = merge_into_base(model)
    assert type(model.model.decoder.layers[1].fc1) is torch.nn.Linear
    assert torch.equal(model.model.decoder.layers[1].fc1.weight, exact)
    assert len(report.max_abs_error) == 4 and report.worst_abs_error == 0.0 and report.worst_rel_error == 0.0
    assert (logits(model, ids) - with_adapter).abs().max().item() < ATOL
    assert not hasattr(model, "lora_adapters")


def quantized(folder, name="nf4"):
    """The checkpoint loaded in fp32 and quantized in memory (fp32 compute, so only rounding differs)."""
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    return quantize_model(model, QuantizationConfig.from_name(name, bnb_4bit_compute_dtype=torch.float32)).eval()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_into_a_quantized_base_requantizes_and_reports_error(hf_checkpoint, kind):
    folder, _ = hf_checkpoint()
    ids = ids_batch()
    quantization_error = relative(logits(quantized(folder, kind), ids),
                                  logits(qopt.OPTForCausalLM.from_pretrained(folder), ids))
    model = quantized(folder, kind)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, lora_alpha=32, init_lora_weights=False))
    with_adapter = logits(model, ids)
    report = merge_into_base(model)
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    if kind == "nf4":
        assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    else:
        assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
    assert len(report.rel_error) == 4
    assert 1e-4 < report.worst_rel_error < 0.2  # the rounding of the merged weight, and no worse
    assert "max relative error" in report.summary()
    # merging costs about one more round of rounding: the same order as quantizing the base at all
    assert 0 < relative(logits(model, ids), with_adapter) < 2 * quantization_error


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_trains_on_quantized_bases(hf_checkpoint, kind):
    folder, _ = hf_checkpoint()
    model = quantized(folder, kind)
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    ids = ids_batch()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_refuses_adapter_for_a_different_base(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint()
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    model.name_or_path = "org/opt-tiny"
    add_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    other = qopt.OPTForCausalLM(qopt.OPTConfig(**{**dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                                                          ffn_dim=64, num_attention_heads=4,
                                                          max_position_embeddings=64)})).eval()
    with pytest.raises(AdapterError, match=r"has shape \[4, 64\].*needs \[4, 32\]"):
        load_adapter(other, tmp_path / "a", check_base=False)
    assert not hasattr(other, "lora_adapters") and not any(isinstance(m, LoraLinear) for m in other.modules())
    fresh = qopt.OPTForCausalLM.from_pretrained(folder)
    fresh.name_or_path = "org/opt-other"  # another Hub model: refused
    with pytest.raises(AdapterError, match="made for base model 'org/opt-tiny'.*another Hub model"):
        load_adapter(fresh, tmp_path / "a")
    fresh.name_or_path = "/models/opt-other"  # a folder of the same shape (copied, renamed): applied, as in PEFT
    load_adapter(fresh, tmp_path / "a")
    fresh = qopt.OPTForCausalLM.from_pretrained(folder)
    fresh.name_or_path = "/somewhere/opt-tiny/"
    load_adapter(fresh, tmp_path / "a")  # same name, other folder: accepted


def test_refuses_unknown_targets_unsupported_features_and_foreign_tensors(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint()
    model = qopt.OPTForCausalLM.from_pretrained(folder)
    with pytest.raises(AdapterError, match=r"target_modules \['query_key_value'\] match no Linear"):
        add_lora(model, LoraConfig(target_modules=["q_proj", "query_key_value"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    add_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    unload(model)
    config_file = tmp_path / "a" / ADAPTER_CONFIG
    original = config_file.read_text()
    config_file.write_text(original.replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(AdapterError, match="use_dora=True"):
        load_adapter(model, tmp_path / "a")
    config_file.write_text(original.replace('"peft_type": "LORA"', '"peft_type": "IA3"'))
    with pytest.raises(AdapterError, match="peft_type"):
        load_adapter(model, tmp_path / "a")
    config_file.write_text(original)
    weights = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    weights["base_model.model.model.decoder.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, tmp_path / "a" / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="layers.7.self_attn.q_proj"):
        load_adapter(model, tmp_path / "a")
    assert not hasattr(model, "lora_adapters")


def test_config_validation_names_the_field():
    with pytest.raises(AdapterError, match="'r'"):
        LoraConfig(r=0)
    with pytest.raises(AdapterError, match="'bias'"):
        LoraConfig(bias="some")
    with pytest.raises(AdapterError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa")
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 32 / 4
