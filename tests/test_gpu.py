"""GPU readiness: loading, placement, decoding, perplexity, QLoRA, saving, calibration and the memory plan on
CUDA, each checked against the CPU run on small random OPTs.

Skipped, with the reason, where `torch.cuda.is_available()` is false (`make test` also deselects the `gpu`
marker). `evals/gpu_check.py` (`make gpu-check`) runs this file on a GPU. `QOPT_GPU_TEST_DEVICE=cpu` runs the
same code with the CPU standing in for the GPU: that checks the tests themselves, not the GPU (comparisons
are then CPU against CPU, and the allocator test is skipped).
"""
import os
import random

import pytest
import torch

import qopt
from qopt.compat.models import check_model_folder
from qopt.evaluation.perplexity import evaluate_ids
from qopt.io.checkpoint import inspect_checkpoint
from qopt.model.network import input_device
from tests.conftest import make_hf_model, save_random_opt

DEVICE = os.environ.get("QOPT_GPU_TEST_DEVICE", "cuda")
GPU = 0 if DEVICE == "cuda" else "cpu"  # the device map's name for the device under test
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device on this machine (torch.cuda.is_available() is False)")]
BF16 = torch.bfloat16
GPU_PRESETS = ["int8", "nf4", "fp4", "nf4-dq"]
# max |logit difference| / max |logit| between the GPU and CPU kernels (4-bit: the CPU kernel reads bf16 absmax)
REL = {"int8": 0.02, "nf4": 0.02, "fp4": 0.02, "nf4-dq": 0.02, None: 0.01}


def load(folder, **kwargs):
    return qopt.load(folder, progress=False, **{"torch_dtype": BF16, **kwargs})


def logits(model, ids):
    with torch.no_grad():
        return model(ids.to(input_device(model))).logits.float().cpu()


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def on_device(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    """Four decoder layers, peaky head (scaled output embedding: greedy choices have wide margins)."""
    folder = tmp_path_factory.mktemp("gpu") / "fp16"
    make_hf_model(peaky=8.0, num_hidden_layers=4).half().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    """The real OPT vocabulary (so WikiText and text files tokenize), hidden 64, peaky head."""
    return save_random_opt(tmp_path_factory.mktemp("gpu") / "vocab", peaky=10, dtype=torch.float16)


IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_load_to_gpu_from_fp16_and_from_a_prequantized_folder(fp16, tmp_path, name):
    gpu = load(fp16, quantization=name, device_map={"": GPU})
    assert on_device(gpu) == {DEVICE} and gpu.hf_device_map == {"": GPU}
    qopt.quantize_checkpoint(fp16, tmp_path / "q", name)
    pre = load(tmp_path / "q", device_map={"": GPU})
    assert on_device(pre) == {DEVICE} and pre.config.quantization_config["load_in_8bit"] == (name == "int8")
    cpu = load(fp16, quantization=name)
    assert close(logits(gpu, IDS), logits(cpu, IDS), REL[name])
    assert close(logits(pre, IDS), logits(cpu, IDS), REL[name])


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_gpu_cpu_disk_map_gives_the_all_gpu_logits(fp16, tmp_path, name):
    everything = load(fp16, quantization=name, device_map={"": GPU})
    reference = logits(everything, IDS)
    base = {"model.decoder.embed_tokens": GPU, "model.decoder.embed_positions": GPU, "lm_head": GPU,
            "model.decoder.final_layer_norm": GPU, "model.decoder.layers.0": GPU, "model.decoder.layers.1": GPU}
    on_disk = load(fp16, quantization=name, offload_folder=tmp_path / "off1", device_map={
        **base, "model.decoder.layers.2": GPU, "model.decoder.layers.3": "disk"})
    assert torch.equal(logits(on_disk, IDS), reference)  # disk layers run on the GPU: the same kernels
    spread = load(fp16, quantization=name, offload_folder=tmp_path / "off2", device_map={
        **base, "model.decoder.layers.2": "cpu", "model.decoder.layers.3": "disk"})
    assert set(spread.hf_device_map.values()) == {GPU, "cpu", "disk"}
    assert close(logits(spread, IDS), reference, REL[name])  # layer 2 runs on the CPU kernel



@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_host_layers_run_on_the_gpu_with_the_all_gpu_logits(fp16, tmp_path, name):
    """Layers placed "host" stay in (pinned) host RAM and run on the GPU: the GPU's kernels, so the GPU's logits,
    window-major and layer-major alike."""
    everything = load(fp16, quantization=name, device_map={"": GPU})
    reference = logits(everything, IDS)
    base = {"model.decoder.embed_tokens": GPU, "model.decoder.embed_positions": GPU, "lm_head": GPU,
            "model.decoder.final_layer_norm": GPU, "model.decoder.layers.0": GPU, "model.decoder.layers.1": GPU}
    hosted = load(fp16, quantization=name, device_map={**base, "model.decoder.layers.2": "host",
                                                        "model.decoder.layers.3": "host"})
    stored = hosted._qopt_host
    assert all(t.device.type == "cpu" for t in stored.values())
    assert all(t.is_pinned() for t in stored.values()) == (DEVICE == "cuda")
    assert torch.equal(logits(hosted, IDS), reference)
    ids = IDS.reshape(-1)
    streamed = evaluate_ids(hosted, ids, 8, progress=False)  # layer-major: each host layer copied once
    assert streamed.streaming["host_bytes_copied"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert streamed.nll == pytest.approx(evaluate_ids(everything, ids, 8, progress=False).nll, rel=1e-3)


@pytest.mark.parametrize("name", [None, "nf4", "int8"])
def test_greedy_generation_equals_the_cpu_run(fp16, name):
    prompt = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    runs = []
    for device_map in ({"": GPU}, None):
        model = load(fp16, quantization=name, device_map=device_map)
        out = model.generate(prompt.to(input_device(model)), max_new_tokens=16, do_sample=False)
        runs.append(out.cpu())
    assert runs[0].shape == (2, 22) and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", [None, "nf4"])
def test_perplexity_on_four_windows_matches_the_cpu_run(vocab_model, name):
    results = [qopt.evaluate_perplexity(load(vocab_model, quantization=name, device_map=m), max_windows=4,
                                        progress=False) for m in ({"": GPU}, None)]
    assert results[0].windows == results[1].windows == 4
    assert abs(results[0].ppl / results[1].ppl - 1) < 0.01, (results[0].ppl, results[1].ppl)


def test_qlora_step_on_gpu_lowers_the_loss_and_the_adapter_reloads(vocab_model, tmp_path):
    rng = random.Random(0)
    names, things = ["Alice", "Bob", "Carol", "Dave"], ["apples", "books", "coins"]
    text = "\n".join(f"{rng.choice(names)} gave {rng.choice(names)} {rng.randint(2, 9)} {rng.choice(things)}."
                     for _ in range(300))
    (tmp_path / "train.txt").write_text(text)
    args = qopt.TrainingArguments(str(tmp_path / "out"), max_steps=24, batch_size=4, learning_rate=3e-3,
                                  optimizer="adamw8bit", seed=0, progress=False)
    result = qopt.finetune(vocab_model, tmp_path / "train.txt", args, qopt.LoraConfig(r=4, target_modules="all-linear"),
                           quantization="nf4", device_map={"": GPU}, block_size=32)
    assert sum(result.losses[-4:]) < sum(result.losses[:4]), result.losses
    base = load(vocab_model, quantization="nf4", device_map={"": GPU})
    ids = torch.tensor([qopt.OPTTokenizer.from_pretrained().encode(text[:200])[:32]])
    before = logits(base, ids)
    qopt.load_adapter(base, tmp_path / "out")
    after = logits(base, ids)
    assert not torch.equal(before, after)
    loss = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (before, after)]
    assert loss[1] < loss[0], loss  # the reloaded adapter carries what training learned


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_save_after_gpu_use_is_byte_identical(fp16, tmp_path, name):
    qopt.quantize_checkpoint(fp16, tmp_path / "q", name)
    model = load(tmp_path / "q", device_map={"": GPU})
    model.save_pretrained(tmp_path / "before")
    logits(model, IDS)
    model.generate(IDS[:, :4].to(input_device(model)), max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path / "after")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / file).read_bytes() == (tmp_path / "after" / file).read_bytes()
    # and the GPU wrote exactly the CPU-quantized bytes it read
    source = (tmp_path / "q" / "model.safetensors").read_bytes()
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == source


def test_calibration_of_one_layer_on_gpu(tmp_path):
    make_hf_model(peaky=3.0, num_hidden_layers=1).half().save_pretrained(tmp_path / "one")
    windows = torch.randint(3, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    _, cpu = qopt.calibrate(tmp_path / "one", windows, progress=False)
    model, gpu = qopt.calibrate(tmp_path / "one", windows, progress=False, device=DEVICE)
    assert on_device(model) == {"cpu"}  # calibrated on the device, kept where a folder's model lives
    for ours, theirs in zip(gpu.modules, cpu.modules, strict=True):
        assert ours.name == theirs.name and ours.calibrated_error <= ours.rtn_error
        assert abs(ours.calibrated_error / theirs.calibrated_error - 1) < 0.05, (ours, theirs)
    model.save_pretrained(tmp_path / "gptq")
    assert check_model_folder(tmp_path / "gptq", "vllm").ok
    placed = load(tmp_path / "one", torch_dtype=torch.float32, device_map={"": GPU})
    calibrated, _ = qopt.calibrate(placed, windows, progress=False)  # follows the model's placement
    fc1 = calibrated.model.decoder.layers[0].fc1
    assert type(fc1).__name__ == "Linear4bit" and fc1.weight.device.type == DEVICE


@pytest.mark.skipif(DEVICE != "cuda", reason="measures the CUDA caching allocator")
def test_plan_gpu_figure_matches_the_allocation_after_a_load(tmp_path):
    model = make_hf_model(hidden_size=512, ffn_dim=2048, num_hidden_layers=4, num_attention_heads=8)
    model.half().save_pretrained(tmp_path / "m")
    planned = qopt.plan(tmp_path / "m", 4, {0: "20GiB", "cpu": "20GiB"}, context=64)
    assert set(planned.device_map.values()) == {0}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load(tmp_path / "m", quantization="nf4", device_map={"": 0})
    resident = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    weights = planned.weight_bytes["0"]
    assert abs(resident / weights - 1) < 0.05, (resident, weights)
    largest = max(t.nbytes for t in inspect_checkpoint(tmp_path / "m").tensors.values())
    assert peak <= weights + 4 * largest + 2**20, (peak, weights, largest)  # one float tensor in flight
    print(f"plan {weights} B, resident {resident} B, load peak {peak} B")
    del model
