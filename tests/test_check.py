"""`qopt check`: vLLM's, transformers' and PEFT's loader contracts, a passing and a failing folder for every rule.

qopt's own saves are the passing folders; each failing one is a save with one thing broken. Where transformers
is installed here, its verdict is checked against a real load as well (vLLM needs a GPU and is not installed).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qopt
from qopt import cli
from qopt.compat.adapters import check_adapter_folder
from qopt.compat.models import check_model_folder, rule_names
from qopt.errors import AdapterError
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import quantize_model
from tests.conftest import VARIANTS, make_hf_model

BF16 = torch.bfloat16
L0, L1 = "model.decoder.layers.0.", "model.decoder.layers.1."
QKV16 = {L0 + f"self_attn.{p}": 16 for p in ("q_proj", "k_proj", "v_proj")}


def _quantized(root, name, config):
    model = quantize_model(qopt.load(root / "fp16", torch_dtype=BF16, progress=False), config)
    model.save_pretrained(root / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float16 checkpoint and qopt's saves of it (module-scoped: built once, copied before any edit)."""
    root = tmp_path_factory.mktemp("check")
    make_hf_model(peaky=3.0).half().save_pretrained(root / "fp16")
    for name in ("nf4", "nf4-dq", "fp4", "int8"):
        qopt.load(root / "fp16", quantization=name, torch_dtype=BF16, progress=False).save_pretrained(root / name)
    # one width plus 16-bit linears (--high-bits 16): layer 0's q/k/v and layer 1's fc2 stay bf16
    _quantized(root, "nf4+16", QuantizationConfig(load_in_4bit=True, module_bits={**QKV16, L1 + "fc2": 16}))
    _quantized(root, "nf4+int8", QuantizationConfig(load_in_4bit=True, module_bits={L0 + "fc1": 8}))
    _quantized(root, "q16", QuantizationConfig(load_in_4bit=True, module_bits={L0 + "self_attn.q_proj": 16}))
    model = qopt.load(root / "fp16", torch_dtype=BF16, progress=False)
    qopt.add_lora(model, qopt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    qopt.save_adapter(model, root / "adapter")
    return root


def variant(saved, tmp_path, base, config=None, state=None, add=()):
    """A copy of `base` with config.json's quantization_config and / or the weights edited, or files added."""
    out = tmp_path / f"{base}-edited"
    shutil.copytree(saved / base, out)
    if config is not None:
        data = json.loads((out / "config.json").read_text())
        config(data)
        (out / "config.json").write_text(json.dumps(data))
    if state is not None:
        tensors = load_file(out / "model.safetensors")
        state(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in add:
        shutil.copy(saved / "adapter" / name, out / name) if (saved / "adapter" / name).exists() else \
            save_file({"x": torch.zeros(1)}, out / name)
    return out


def failed(report) -> set[str]:
    return {f.rule for f in report.failures}


# -- passing folders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("consumer", ["vllm", "transformers"])
@pytest.mark.parametrize("name", ["fp16", "nf4", "nf4-dq", "fp4", "int8", "nf4+16"])
def test_qopt_saves_pass_every_rule(saved, name, consumer):
    report = check_model_folder(saved / name, consumer)
    assert report.ok and all(f.passed for f in report.findings), report.format()


def test_single_width_saves_name_their_16bit_linears_for_both_loaders(saved):
    skip = json.loads((saved / "nf4+16" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert L0 + "self_attn.qkv_proj" in skip and L1 + "fc2" in skip and "lm_head" in skip  # vLLM's fused name too
    loaded = qopt.load(saved / "nf4+16", progress=False)
    assert type(loaded.model.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(loaded.model.decoder.layers[0].self_attn.out_proj).__name__ == "Linear4bit"


def test_quantize_command_and_calibration_write_loadable_folders(saved, tmp_path, capsys):
    assert cli.main(["quantize", str(saved / "fp16"), "-o", str(tmp_path / "cli"), "--quantization", "nf4-dq"]) == 0
    make_hf_model(peaky=3.0, **VARIANTS["post_ln_proj"]).half().save_pretrained(tmp_path / "proj")
    windows = torch.randint(3, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    model, _ = qopt.calibrate(tmp_path / "proj", windows, progress=False)  # project_in / out stay 16-bit
    model.save_pretrained(tmp_path / "gptq")
    for folder in ("cli", "gptq"):
        for consumer in ("vllm", "transformers"):
            report = check_model_folder(tmp_path / folder, consumer)
            assert report.ok, report.format()
    capsys.readouterr()
    assert cli.main(["check", str(tmp_path / "gptq")]) == 0
    out = capsys.readouterr().out
    assert "for vllm: loads" in out and "for transformers: loads" in out and "16-bit linears besides" in out


def test_parallelism_says_what_vllm_can_shard(saved):
    pre = check_model_folder(saved / "nf4", "vllm").parallelism
    assert pre[0].startswith("tensor parallel: 1 only") and "1 to 2 stages" in pre[1]
    assert check_model_folder(saved / "fp16", "vllm").parallelism[0].startswith("tensor parallel: 1, 2, 4 ")
    assert any("eagerly" in line for line in check_model_folder(saved / "int8", "vllm").parallelism)


# -- failing folders, one per rule ----------------------------------------------------------------------------
def _drop(*keys):
    return lambda d: [d.pop(k) for k in keys]


def _set(**values):
    return lambda d: d.update(values)


def _qdrop(*keys):  # the same, inside config.json's quantization_config
    return lambda c: _drop(*keys)(c["quantization_config"])


def _qset(**values):
    return lambda c: _set(**values)(c["quantization_config"])


def _unskip(name):
    return lambda c: c["quantization_config"]["llm_int8_skip_modules"].remove(name)


def _del_tensor(key):
    return lambda s: s.pop(key)


# (rule, base folder, config edit, weights edit, added files, consumers that must fail it)
BROKEN = [
    ("architecture", "nf4", lambda c: c.update(architectures=["OPTForSequenceClassification"]), None, (), ["vllm"]),
    ("quant-method", "nf4", _qset(quant_method="gptq"), None, (), ["vllm", "transformers"]),
    ("load-flags", "nf4-dq", _qdrop("load_in_4bit", "load_in_8bit"), None, (), ["vllm", "transformers"]),
    ("load-flags", "int8", _qset(load_in_8bit=False, load_in_4bit=True, _load_in_8bit=False), None, (),
     ["vllm", "transformers"]),
    ("single-width", "nf4+int8", None, None, (), ["vllm", "transformers"]),
    ("quant-type", "nf4", _qdrop("bnb_4bit_quant_type"), None, (), ["vllm"]),
    ("quant-type", "nf4", _qset(bnb_4bit_quant_type="fp4"), None, (), ["vllm"]),
    ("double-quant", "nf4-dq", _qset(bnb_4bit_use_double_quant=False), None, (), ["vllm"]),
    ("compute-dtype", "nf4", _qdrop("bnb_4bit_compute_dtype"), None, (), ["vllm"]),
    ("quant-storage", "nf4", _qset(bnb_4bit_quant_storage="bfloat16"), None, (), ["vllm"]),
    ("skip-modules", "nf4+16", _qset(llm_int8_skip_modules=None), None, (), ["vllm", "transformers"]),
    ("skip-modules", "nf4+16", _unskip(L0 + "self_attn.qkv_proj"), None, (),
     ["vllm"]),
    ("skip-modules", "nf4", _qset(llm_int8_skip_modules=["lm_head", "fc1"]), None, (), ["vllm", "transformers"]),
    ("skip-modules", "nf4+16", _unskip("lm_head"), None, (), ["transformers"]),
    ("tensors", "nf4-dq", None, _del_tensor(L0 + "fc1.weight.absmax"), (), ["vllm", "transformers"]),
    ("tensors", "nf4-dq", None, _del_tensor(L1 + "fc2.weight.nested_quant_map"), (), ["vllm", "transformers"]),
    ("tensors", "int8", None, _del_tensor(L0 + "fc1.SCB"), (), ["vllm", "transformers"]),
    ("qkv-split", "q16", None, None, (), ["vllm"]),
    ("qkv-split", "nf4", None, lambda s: s.update({L0 + "self_attn.qkv_proj.weight": torch.zeros(3, 2)}), (),
     ["vllm", "transformers"]),
    ("weight-files", "nf4", None, None, ["extra.safetensors"], ["vllm"]),
    ("no-adapter", "nf4", None, None, ["adapter_config.json", "adapter_model.safetensors"], ["vllm"]),
]


@pytest.mark.parametrize("rule, base, config, state, add, consumers", BROKEN,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BROKEN)])
def test_a_broken_folder_fails_its_rule(saved, tmp_path, rule, base, config, state, add, consumers):
    folder = variant(saved, tmp_path, base, config, state, add)
    for consumer in ("vllm", "transformers"):
        report = check_model_folder(folder, consumer)
        if consumer in consumers:
            assert rule in failed(report) and not report.ok, report.format()
        else:  # either passes, or is a note: this consumer loads the folder anyway
            assert rule not in failed(report), report.format()


def test_every_rule_has_a_failing_folder():
    assert {case[0] for case in BROKEN} == set(rule_names())


def test_notes_where_a_consumer_loads_anyway(saved, tmp_path):
    folder = variant(saved, tmp_path, "nf4", None, None, ["extra.safetensors", "adapter_config.json"])
    report = check_model_folder(folder, "transformers")
    notes = {f.rule for f in report.findings if not f.passed and not f.fatal}
    assert report.ok and notes == {"weight-files", "no-adapter"}, report.format()


def test_mixed_4_8_bit_save_is_reported_qopt_only(saved, capsys):
    assert cli.main(["check", str(saved / "nf4+int8"), "--for", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL single-width" in out and "qopt-only" in out and "qopt_module_bits" in out
    assert qopt.load(saved / "nf4+int8", progress=False) is not None  # qopt itself loads it


def test_unreadable_folders(saved, tmp_path, capsys):
    report = check_model_folder(saved / "adapter", "vllm")
    assert failed(report) == {"readable"} and "adapter" in report.findings[0].detail
    assert cli.main(["check", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("name, edit, loads", [
    ("nf4+16", None, True),
    ("nf4+16", _qset(llm_int8_skip_modules=None), False),
    ("nf4+16", _unskip("lm_head"), False),
    ("nf4-dq", _qdrop("load_in_4bit", "load_in_8bit"), False),
    ("nf4", _qset(llm_int8_skip_modules=["lm_head", "fc1"]), False),
    ("nf4+int8", None, False),
])
def test_transformers_verdict_matches_a_real_load(saved, tmp_path, name, edit, loads):
    """"Loads" means transformers builds the model qopt saved: the same logits as qopt's own load of the unedited
    folder. A failing folder either raises in transformers or loads into something else, silently."""
    from transformers import OPTForCausalLM

    folder = variant(saved, tmp_path, name, edit)
    assert check_model_folder(folder, "transformers").ok == loads
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = qopt.load(saved / name, progress=False)(ids).logits
        try:
            got = OPTForCausalLM.from_pretrained(folder, dtype=BF16).eval()(ids).logits
        except Exception:  # noqa: BLE001 - any failure to load counts
            got = None
    assert (got is not None and torch.equal(got, expected)) == loads


# -- adapters -----------------------------------------------------------------------------------------------
def test_qopt_adapter_passes_peft_and_is_detected(saved, capsys):
    report = check_adapter_folder(saved / "adapter")
    assert report.ok and all(f.passed for f in report.findings), report.format()
    assert cli.main(["check", str(saved / "adapter")]) == 0
    assert "for peft: loads" in capsys.readouterr().out


def _edit_adapter(saved, tmp_path, config=None, state=None, add=()):
    out = tmp_path / "adapter"
    shutil.copytree(saved / "adapter", out)
    if config is not None:
        data = json.loads((out / "adapter_config.json").read_text())
        config(data)
        (out / "adapter_config.json").write_text(json.dumps(data))
    if state is not None:
        tensors = load_file(out / "adapter_model.safetensors")
        state(tensors)
        save_file(tensors, out / "adapter_model.safetensors")
    for name in add:
        shutil.copy(saved / "nf4" / name, out / name)
    return out


Q = "base_model.model.model.decoder.layers.0.self_attn.q_proj"
BROKEN_ADAPTERS = [
    ("adapter-config", _set(peft_type="PREFIX_TUNING"), None, ()),
    ("adapter-config", _drop("r"), None, ()),
    ("adapter-keys", None, lambda s: s.update({Q[len("base_model.model."):] + ".lora_A.weight": s.pop(
        Q + ".lora_A.weight")}), ()),
    ("adapter-keys", None, lambda s: s.update({Q + ".lora_A.default.weight": s.pop(Q + ".lora_A.weight")}), ()),
    ("adapter-keys", None, _del_tensor(Q + ".lora_B.weight"), ()),
    ("adapter-keys", _set(r=8), None, ()),
    ("adapter-keys", _set(target_modules=["v_proj"]), None, ()),
    ("adapter-alone", None, None, ("config.json", "model.safetensors")),
]


@pytest.mark.parametrize("rule, config, state, add", BROKEN_ADAPTERS,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BROKEN_ADAPTERS)])
def test_a_broken_adapter_fails_its_rule(saved, tmp_path, rule, config, state, add):
    report = check_adapter_folder(_edit_adapter(saved, tmp_path, config, state, add))
    assert rule in failed(report), report.format()


def test_missing_adapter_files(saved, tmp_path):
    assert failed(check_adapter_folder(saved / "nf4")) >= {"adapter-config", "adapter-weights"}
    folder = _edit_adapter(saved, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    assert failed(check_adapter_folder(folder)) == {"adapter-weights"}


def test_an_adapter_is_never_saved_into_a_model_folder(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved / "nf4", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = qopt.load(saved / "fp16", torch_dtype=BF16, progress=False)
    qopt.add_lora(model, qopt.LoraConfig(r=4))
    with pytest.raises(AdapterError, match=r"holds a model \(config.json \+ model.safetensors\)") as err:
        qopt.save_adapter(model, folder)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
