"""Memory planning: exact quantized sizes, device maps from accelerate, the `qopt plan` report."""
import pytest
import torch

import qopt
from qopt import cli
from qopt.errors import ConfigError, PlanError
from qopt.place.device_map import infer_device_map, normalize_max_memory, summarize
from qopt.place.plan import config_for, plan
from qopt.place.sizes import meta_model
from qopt.quant import internals
from qopt.quant.config import QuantizationConfig
from qopt.quant.formats import quantized_weight_bytes
from qopt.quant.modules import is_quantized, quantize_linear

GIB = 2**30


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes a freshly loaded module holds in memory (for 4-bit: codes, absmax, code book, bias, and nested
    statistics with their offset)."""
    tensors = [p for p in module.parameters(recurse=False) if p is not None]
    if is_quantized(module) and hasattr(module.weight, "SCB"):
        tensors.append(module.weight.SCB)
    elif is_quantized(module):
        packed = module.weight.quant_state if internals.is_cpu_packed(module.weight.quant_state) else None
        state = module._statistics if packed is not None else module.weight.quant_state  # the saved statistics
        tensors += [state.absmax, state.code]
        tensors += [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
        tensors += [packed.absmax] if packed is not None else []  # the CPU kernel's bf16 copy
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4-dq"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 40), (1000, 2048)])
def test_quantized_weight_bytes_are_exact(name, shape):
    config = QuantizationConfig.from_name(name)
    held = held_bytes(quantize_linear(torch.nn.Linear(shape[1], shape[0], bias=False), config))
    assert quantized_weight_bytes(*shape, config.bits, config.bnb_4bit_use_double_quant) == held


@pytest.mark.parametrize("name", ["int8", "nf4", "nf4-dq"])
def test_planned_weight_bytes_equal_the_loaded_model(hf_checkpoint, name):
    folder, _ = hf_checkpoint()
    result = plan(folder, 8 if name == "int8" else 4, {"cpu": "1GiB"}, context=16, batch=2,
                  quant_type=name[:3] if name != "int8" else "nf4", double_quant=name.endswith("-dq"),
                  dtype=torch.bfloat16)
    model = qopt.load(folder, quantization=name, torch_dtype=torch.bfloat16, progress=False)
    if name != "int8":
        with torch.no_grad():
            model(torch.tensor([[2, 5, 7]]))  # 4-bit layers computing on a CPU take the kernel's layout here
    held = sum(held_bytes(m) for m in model.modules()) - model.lm_head.weight.numel() * 2  # tied: one tensor
    assert result.weight_bytes["cpu"] + result.cpu_layout_bytes == held and set(result.weight_bytes) == {"cpu"}
    config = model.config
    # on a CPU-only plan the cache is float32, as `generate` keeps it there
    assert result.kv_cache_bytes == {"cpu": 2 * 2 * 16 * config.hidden_size * 4 * config.num_hidden_layers}
    assert result.fits and result.parameters == sum(p.numel() for p in qopt.load(folder, progress=False).parameters())


def test_opt_30b_fits_a_24gib_gpu_in_4bit_with_its_kv_cache_but_not_in_8bit():
    four = plan("opt-30b", 4, {0: "24GiB", "cpu": "64GiB"}, context=2048, batch=1)
    assert four.fits and set(four.device_map.values()) == {0}
    kv = 2 * 2048 * 7168 * 2 * 48  # keys and values, bf16, 48 layers
    assert four.kv_cache_bytes == {"0": kv}
    assert 16 * GIB < four.weight_bytes["0"] < 17 * GIB  # 29.6B linear weights at 4.5 bits + bf16 embeddings
    assert four.used_bytes("0") <= 24 * GIB
    eight = plan("opt-30b", 8, {0: "24GiB", "cpu": "64GiB"}, context=2048, batch=1)
    assert not eight.fits and "cpu" in eight.device_map.values()
    assert sum(eight.weight_bytes.values()) > 28 * GIB
    assert eight.used_bytes("0") <= 24 * GIB  # what stays on the GPU still fits with its share of the cache
    assert eight.device_map["lm_head"] == eight.device_map["model.decoder.embed_tokens"]  # tied weights


def test_cli_plan_states_the_verdict_and_the_map(capsys):
    assert cli.main(["plan", "opt-30b", "--bits", "4", "--gpu", "24GiB", "--cpu", "64GiB", "--context", "2048",
                     "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits: GPU 0\n" in out and "0: everything" in out
    assert "load with: --bits 4 --quant-type nf4 --device-map auto --max-memory 0=24GiB cpu=64GiB --context 2048\n" \
        in out
    assert cli.main(["plan", "opt-30b", "--bits", "8", "--gpu", "24GiB", "--cpu", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits: GPU 0 + CPU" in out and "cpu: layers" in out
    assert cli.main(["plan", "opt-30b", "--bits", "4", "--gpu", "12GiB", "--gpu", "12GiB", "--cpu", "0"]) == 0
    assert "verdict: fits: GPUs 0-1\n" in capsys.readouterr().out  # no "fits on GPU 0: no" for a 2-GPU fit
    for cpu in ("0", "4GiB", "8GiB"):  # the layers that fit on neither go to disk, their KV cache on the GPU
        assert cli.main(["plan", "opt-66b", "--gpu", "24GiB", "--cpu", cpu]) == 0
        assert "verdict: needs disk: layers" in capsys.readouterr().out
    assert cli.main(["plan", "opt-66b", "--gpu", "1GiB", "--cpu", "0"]) == 1  # the embeddings alone: exit 1
    assert "verdict: cannot load: GPU 0 needs" in capsys.readouterr().out
    assert cli.main(["plan", "opt-7b"]) == 2
    assert "known size" in capsys.readouterr().err


def test_config_names_and_paper_shapes():
    assert config_for("opt-1.3b")[0].hidden_size == 2048  # a bare size name; facebook/opt-1.3b is a Hub id
    assert config_for("opt-350m")[0].word_embed_proj_dim == 512  # the released config, projections included
    for name, (layers, hidden, heads, ffn) in {"opt-2.7b": (32, 2560, 32, 10240), "13b": (40, 5120, 40, 20480),
                                               "OPT-66B": (64, 9216, 72, 36864),
                                               "opt-175b": (96, 12288, 96, 49152)}.items():
        config, _ = config_for(name)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.ffn_dim) == \
            (layers, hidden, heads, ffn)
        assert config.do_layer_norm_before and config.vocab_size == 50272
    with pytest.raises(ConfigError, match="opt-125m, opt-350m, opt-1.3b, opt-2.7b"):
        config_for("opt-7b")


def test_device_map_fills_devices_in_order_and_summarizes_ranges():
    config, _ = config_for("opt-1.3b")
    model = meta_model(config, QuantizationConfig.from_name("nf4"))
    device_map = infer_device_map(model, torch.bfloat16, "sequential", {0: "400MiB", "cpu": "300MiB"})
    devices = list(device_map.values())
    assert devices.index("cpu") < devices.index("disk") and 0 in devices
    layers = {int(n.split(".")[-1]): d for n, d in device_map.items() if ".layers." in n}
    order = {0: 0, "cpu": 1, "disk": 2}
    assert [order[layers[i]] for i in sorted(layers)] == sorted(order[layers[i]] for i in layers)
    lines = summarize(device_map)
    assert any(line.startswith("disk: layers ") and line.endswith("-23") for line in lines)
    assert summarize({"model.decoder.layers.0": "cpu", "model.decoder.layers.1": "cpu",
                      "model.decoder.layers.3": "cpu", "b": "cpu"}) == \
        ["cpu: b, layers 0-1, 3"]


def test_max_memory_forms():
    assert normalize_max_memory({"gpu": "1GiB", "cpu": 10, "cuda:1": "1KB"}) == {0: GIB, 1: 1000, "cpu": 10}
    with pytest.raises(PlanError, match="unknown device"):
        normalize_max_memory({"tpu": "1GiB"})
    with pytest.raises(PlanError, match="expected bytes"):
        normalize_max_memory({"cpu": "lots"})


def test_streaming_from_host_keeps_the_cpu_layers_in_ram_and_reserves_the_gpu_for_them(capsys):
    memory = {0: "12GiB", "cpu": "32GiB"}
    computed = plan("opt-30b", 4, memory)
    streamed = plan("opt-30b", 4, memory, stream_from_host=True)
    cpu_layers = [n for n, d in computed.device_map.items() if d == "cpu" and n.startswith("model.decoder.layers.")]
    host_layers = [n for n, d in streamed.device_map.items() if d == "host"]
    assert cpu_layers and host_layers and "cpu" not in streamed.device_map.values()
    # every layer's KV cache lives on the GPU now, with the layers in flight: fewer layers stay resident there
    assert len(host_layers) > len(cpu_layers)
    assert streamed.kv_cache_bytes == {"0": streamed.kv_cache_bytes["0"]} and streamed.stream_buffer_bytes > 0
    assert streamed.used_bytes("0") <= streamed.limits["0"] and streamed.loadable
    assert streamed.used_bytes("cpu") >= streamed.weight_bytes["host"]  # host weights count in the CPU's RAM
    assert streamed.verdict == "fits: GPU 0 + layers streamed from host RAM"
    assert "--stream-from-host" in streamed.flags()
    assert cli.main(["plan", "opt-30b", "--gpu", "12GiB", "--cpu", "32GiB", "--stream-from-host"]) == 0
    out = capsys.readouterr().out
    assert "host: layers" in out and "copied to GPU 0 once per generated token" in out
    with pytest.raises(PlanError, match="stream_from_host runs layers stored in host RAM on a GPU"):
        plan("opt-30b", 4, {"cpu": "64GiB"}, stream_from_host=True)
