"""Bigger than memory, and fast: layer-major evaluation, prefetch, the CPU layout of offloaded 4-bit layers and
throughput generation for models with decoder layers on disk."""
import json
import threading

import pytest
import torch

import qopt
from qopt.bundled import bundled_model_dir
from qopt.errors import GenerationError
from qopt.evaluation.perplexity import evaluate_ids
from qopt.loading.layer_runner import HiddenStore, LayerRunner, has_offloaded_layers, layer_hooks
from qopt.place import offload_io
from qopt.place.offload_io import PACKED_SUFFIX, Prefetcher
from tests.conftest import make_hf_model

LAYERS = 4
HALF_ON_DISK = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu", "model.decoder.layers.0": "cpu",
                "model.decoder.layers.1": "disk", "model.decoder.layers.2": "cpu", "model.decoder.layers.3": "disk"}
IDS = torch.randint(3, 1000, (230,), generator=torch.Generator().manual_seed(0))  # 7 windows of 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 4-layer OPT with a peaky head (greedy decoding cannot flip on near-ties)."""
    folder = tmp_path_factory.mktemp("stream") / "ckpt"
    make_hf_model(num_hidden_layers=LAYERS, peaky=8.0).save_pretrained(folder)
    return folder


def load(folder, tmp_path, quantization=None, device_map=HALF_ON_DISK):
    dtype = torch.bfloat16 if quantization else torch.float32
    return qopt.load(folder, quantization=quantization, torch_dtype=dtype, device_map=device_map,
                     offload_folder=tmp_path / "offload" if device_map else None, progress=False)


def offloaded_keys(model):
    return [k for k in model._qopt_offloaded if k.startswith(("model.decoder.layers.1.", "model.decoder.layers.3."))]


# -- layer-major evaluation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_layer_major_perplexity_equals_window_major_and_reads_each_offloaded_layer_once(checkpoint, tmp_path,
                                                                                         quantization):
    model = load(checkpoint, tmp_path, quantization)
    assert has_offloaded_layers(model) and sorted(layer_hooks(model)) == [1, 3]
    store = model._qopt_offloaded
    offloaded = sum(store.nbytes(k) for k in offloaded_keys(model))
    streamed = evaluate_ids(model, IDS, 32, progress=False, micro_batch=3)  # groups of 3, 3 and 1 windows
    assert streamed.streaming["mode"] == "layer-major" and streamed.windows == 7
    assert store.bytes_read == streamed.streaming["bytes_read"] == offloaded  # one read of every offloaded byte
    assert set(store.reads) == set(offloaded_keys(model)) and set(store.reads.values()) == {1}
    store.reads.clear()
    window_major = evaluate_ids(model, IDS, 32, progress=False, streamed=False)
    assert window_major.streaming is None and window_major.tokens == streamed.tokens
    assert streamed.nll == pytest.approx(window_major.nll, rel=1e-6)
    weight = "model.decoder.layers.3.fc1.weight"  # read per window (4-bit: in the CPU layout once it exists)
    assert store.reads[weight] + store.reads[weight + PACKED_SUFFIX] == 7
    in_memory = load(checkpoint, tmp_path, quantization, device_map=None)
    assert evaluate_ids(in_memory, IDS, 32, progress=False).nll == pytest.approx(streamed.nll, rel=1e-6)


def test_reference_kl_and_top1_agree_with_window_major_for_offloaded_and_in_memory_references(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path / "a", "nf4")
    offloaded_ref = load(checkpoint, tmp_path / "b")
    in_memory_ref = load(checkpoint, tmp_path, device_map=None)
    expected = evaluate_ids(model, IDS, 32, progress=False, reference=in_memory_ref, streamed=False)
    for reference in (offloaded_ref, in_memory_ref):
        got = evaluate_ids(model, IDS, 32, progress=False, reference=reference, micro_batch=4)
        assert got.kl == pytest.approx(expected.kl, rel=1e-4, abs=1e-9) and got.kl > 0
        assert got.top1 == pytest.approx(expected.top1) and got.nll == pytest.approx(expected.nll, rel=1e-6)


def test_hidden_states_spill_to_disk_past_the_budget_with_the_same_result(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path)
    ample = evaluate_ids(model, IDS, 32, progress=False, micro_batch=2)
    slot = 2 * 32 * 64 * 4  # one micro-batch of fp32 hidden states
    tight = evaluate_ids(model, IDS, 32, progress=False, micro_batch=2, hidden_budget=slot)
    assert ample.streaming["hidden_spilled"] == 0 and ample.streaming["hidden_peak_in_memory"] > slot
    assert tight.streaming["hidden_budget"] == slot and tight.streaming["hidden_peak_in_memory"] <= slot
    assert tight.streaming["hidden_spilled"] == 3 * slot - slot // 2  # 3 spilled slots, the last holds 1 window
    assert tight.streaming["hidden_spill_read"] > 0 and tight.nll == ample.nll
    assert not list((tmp_path / "offload").glob("*/qopt-hidden-*"))  # spill files are removed
    assert "spilled to disk" in tight.summary()


def test_hidden_store_keeps_values_in_memory_and_on_disk(tmp_path):
    store = HiddenStore(100, tmp_path)
    first, second = torch.arange(20, dtype=torch.float32), torch.arange(5, dtype=torch.bfloat16)
    store.append(first)  # 80 bytes: in memory
    store.append(second * 2)  # 10 bytes: in memory
    store.append(first * 3)  # past the budget: on disk
    store[0] = first + 1
    assert torch.equal(store[0], first + 1) and torch.equal(store[1], second * 2) and torch.equal(store[2], first * 3)
    assert store.spilled_bytes == 80 and store.in_memory == 90
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_bundled_model_layer_major_with_two_windows_equals_window_major(tmp_path):
    placement = {name: "cpu" for name in ("model.decoder.embed_tokens", "model.decoder.embed_positions",
                                          "model.decoder.final_layer_norm", "lm_head")}
    placement.update({f"model.decoder.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)})
    model = qopt.load(bundled_model_dir(), quantization="nf4", device_map=placement, offload_folder=tmp_path,
                      progress=False)
    streamed = qopt.evaluate_perplexity(model, max_windows=2, progress=False)
    store = model._qopt_offloaded
    assert streamed.streaming["bytes_read"] == store.bytes_read == sum(store.nbytes(k) for k in store)
    window_major = qopt.evaluate_perplexity(model, max_windows=2, progress=False, streamed=False)
    assert streamed.windows == window_major.windows == 2 and streamed.tokens == window_major.tokens == 510
    assert streamed.ppl == pytest.approx(window_major.ppl, rel=1e-5)


# -- prefetch and the CPU layout -------------------------------------------------------------------------------
def test_prefetch_reads_in_a_background_thread_and_gives_the_same_hidden_states(checkpoint, tmp_path, monkeypatch):
    model = load(checkpoint, tmp_path, "nf4")
    threads = set()
    read = offload_io.read_exact

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return read(*args, **kwargs)

    monkeypatch.setattr(offload_io, "read_exact", spy)
    outputs = []
    for prefetch in (True, False, True):  # the second prefetched run reads the CPU layout the first one wrote
        streamer = LayerRunner(model, prefetch=prefetch)
        states, masks = zip(*(streamer.embed(IDS[k:k + 64].reshape(2, 32)) for k in (0, 64)), strict=True)
        states = list(states)
        streamer.run(states, masks)
        outputs.append(states)
        assert streamer.stats.passes == 1 and streamer.depth == (2 if prefetch else 0)
    assert all(torch.equal(a, b) for run in outputs[1:] for a, b in zip(outputs[0], run, strict=True))
    assert any(name.startswith("qopt-prefetch") for name in threads) and "MainThread" in threads
    ppl = {p: evaluate_ids(model, IDS, 32, progress=False, prefetch=p).nll for p in (True, False)}
    assert ppl[True] == ppl[False]


def test_prefetcher_hands_out_layers_in_order_and_refuses_another_order(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path)
    store = model._qopt_offloaded
    prefixes = ["model.decoder.layers.1.", "model.decoder.layers.3."]
    with Prefetcher(store, prefixes, depth=1) as fetch:
        first = fetch.get(prefixes[0])
        assert torch.equal(first["model.decoder.layers.1.fc1.weight"], store["model.decoder.layers.1.fc1.weight"])
        fetch.done(prefixes[0])
        with pytest.raises(RuntimeError, match="prefetch order"):
            fetch.get(prefixes[0])
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(store, prefixes, depth=-1)


def test_offloaded_4bit_layers_keep_the_cpu_layout_after_their_first_forward(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path, "nf4-dq")
    in_memory = load(checkpoint, tmp_path, "nf4-dq", device_map=None)
    store = model._qopt_offloaded
    ids = IDS[:24].reshape(2, 12)
    with torch.no_grad():
        expected = in_memory(ids).logits
        for _ in range(3):
            assert torch.equal(model(ids).logits, expected)
    weight = "model.decoder.layers.1.fc1.weight"
    assert store.reads[weight] == 1 and store.reads[weight + PACKED_SUFFIX] == 2  # repacked once, not per forward
    assert store.reads["model.decoder.layers.1.fc1.weight.absmax"] == 1
    assert all(store.reads[k] == 3 for k in store if k.endswith(".weight.quant_map") and ".layers.1." in k)
    assert not any(k.endswith(PACKED_SUFFIX) for k in store)  # a save never sees the CPU layout
    model.save_pretrained(tmp_path / "a")
    in_memory.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# -- throughput generation ---------------------------------------------------------------------------------------
def prompt_list(count=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 10, (count,), generator=generator).tolist()
    return [[2] + torch.randint(3, 1000, (n,), generator=generator).tolist() for n in sizes]


def test_generate_many_equals_one_by_one_and_reads_the_disk_once_per_step(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path)
    store = model._qopt_offloaded
    prompts = prompt_list()
    free_run = qopt.generate(model, torch.tensor([prompts[0]]), max_new_tokens=10, eos_token_id=[])[0]
    end = int(free_run[len(prompts[0]) + 3])  # an end token prompt 0 reaches early
    store.bytes_read = 0
    one_by_one = [qopt.generate(model, torch.tensor([p]), max_new_tokens=10, eos_token_id=end)[0] for p in prompts]
    single_bytes = store.bytes_read
    store.bytes_read = 0
    many = qopt.generate_many(model, prompts, batch_size=3, max_new_tokens=10, eos_token_id=end)
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, many, strict=True)), (one_by_one, many)
    assert len(many[0]) <= len(prompts[0]) + 4 and int(many[0][-1]) == end  # stopped at its end token
    assert any(len(out) == len(p) + 10 for p, out in zip(prompts, many, strict=True))
    offloaded = sum(store.nbytes(k) for k in offloaded_keys(model))
    assert store.bytes_read <= 10 * offloaded < single_bytes / 4  # at most one read per decode step
    in_memory = load(checkpoint, tmp_path, device_map=None)
    again = qopt.generate_many(in_memory, prompts, batch_size=2, max_new_tokens=10, eos_token_id=end)
    assert all(torch.equal(a, b) for a, b in zip(again, many, strict=True))


def test_generate_many_samples_reproducibly_and_refuses_beam_search(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path, "nf4")
    prompts = prompt_list(4)
    runs = [qopt.generate_many(model, prompts, batch_size=2, max_new_tokens=6, do_sample=True, seed=3, top_k=5,
                               eos_token_id=[]) for _ in range(2)]
    assert all(torch.equal(a, b) and len(a) == len(p) + 6 for a, b, p in zip(*runs, prompts, strict=True))
    with pytest.raises(GenerationError, match="beam search"):
        qopt.generate_many(model, prompts, num_beams=2)
    with pytest.raises(GenerationError, match="prompt 1 has no tokens"):
        qopt.generate_many(model, [[2], []])
    with pytest.raises(ValueError, match="batch_size"):
        qopt.generate_many(model, prompts, batch_size=0)


def test_cli_generates_a_prompts_file_into_json_lines(tmp_path, capsys):
    from qopt.cli import main

    folder = tmp_path / "ckpt"
    make_hf_model(num_hidden_layers=2, peaky=8.0, vocab_size=50272).save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello world"}\n"The capital of France is"\n\n{"prompt": "Once"}\n')
    out = tmp_path / "out.jsonl"
    args = ["generate", str(folder), "--prompts-file", str(prompts), "--batch-size", "2", "--max-new-tokens", "5",
            "--bits", "4", "--output", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello world", "The capital of France is", "Once"]
    assert "3 prompts" in capsys.readouterr().err
    model = qopt.load(folder, quantization="nf4", progress=False)
    tok = qopt.OPTTokenizer.from_pretrained()
    for row in rows:
        [alone] = qopt.generate_text(model, tok, row["prompt"], max_new_tokens=5)
        assert row["completion"] == alone
    assert main(["generate", str(folder), "a prompt", "--prompts-file", str(prompts)]) == 2
    assert "only positional argument is MODEL" in capsys.readouterr().err
    assert main(["generate", str(folder), "--prompts-file", str(prompts), "--num-beams", "2"]) == 2
    assert main(["generate", str(folder), "x", "--output", str(out)]) == 2
    assert "apply to --prompts-file" in capsys.readouterr().err


# -- qopt plan: what the offloaded layers cost in reads ---------------------------------------------------------
def test_plan_states_bytes_read_per_token_and_per_pass_with_a_time_estimate(capsys):
    from qopt.cli import main
    from qopt.place.plan import plan

    result = plan("opt-2.7b", 4, {"cpu": "1GiB"}, context=256)
    disk = result.weight_bytes["disk"]
    assert "disk reads:" not in plan("opt-125m", 4, {"cpu": "4GiB"}).format()
    result.read_bandwidth, result.bandwidth_source = disk / 2.0, "given"  # two seconds per read of the disk layers
    text = result.format()
    assert f"disk reads: {qopt.place.plan.format_bytes(disk)} per generated token" in text
    assert "2.00 s per generated token, 2.00 s per evaluation pass" in text
    assert "verdict: needs disk: layers " in text and "load with: " in text  # the existing lines stay
    assert main(["plan", "opt-2.7b", "--cpu", "1GiB", "--context", "256", "--read-bandwidth", "1GiB/s"]) in (0, 1)
    out = capsys.readouterr().out
    assert "read time at 1.00 GiB/s (given)" in out and "device map:" in out
    assert main(["plan", "opt-2.7b", "--cpu", "1GiB", "--read-bandwidth", "fast"]) == 2
    assert "--read-bandwidth fast: expected a positive rate" in capsys.readouterr().err


def test_read_bandwidth_is_measured_past_the_page_cache_and_leaves_no_file(tmp_path):
    from qopt.place.bandwidth import measure_read_bandwidth, parse_rate

    assert measure_read_bandwidth(tmp_path, "2MiB") > 0
    assert list(tmp_path.iterdir()) == []
    assert parse_rate("2GB/s") == 2e9 and parse_rate("512MiB") == 2 ** 29
    with pytest.raises(ValueError, match="read bandwidth '0'"):
        parse_rate("0")


def test_a_16_bit_model_with_layers_on_disk_computes_in_its_own_dtype(checkpoint, tmp_path):
    """Offloaded float tensors come back in the dtype they were stored in (the meta placeholders are float32)."""
    kwargs = dict(torch_dtype=torch.bfloat16, progress=False)
    offloaded = qopt.load(checkpoint, device_map=HALF_ON_DISK, offload_folder=tmp_path, **kwargs)
    in_memory = qopt.load(checkpoint, **kwargs)
    ids = IDS[:24].reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, in_memory(ids).logits)
    streamed = evaluate_ids(offloaded, IDS, 32, progress=False)
    assert streamed.streaming and streamed.nll == pytest.approx(evaluate_ids(in_memory, IDS, 32, progress=False).nll,
                                                                rel=1e-6)


def test_a_layer_read_with_several_threads_equals_one_read_after_the_other(checkpoint, tmp_path, monkeypatch):
    model = load(checkpoint, tmp_path, "nf4")
    store = model._qopt_offloaded
    keys = store.layer_keys("model.decoder.layers.3.")
    store.read_threads = 1
    serial = store.read_keys(keys)
    monkeypatch.setattr(offload_io, "_PARALLEL_BYTES", 0)  # the tiny layer is below the size that goes parallel
    store.read_threads = 4
    threads = set()
    read = offload_io.read_exact
    monkeypatch.setattr(offload_io, "read_exact", lambda *a, **k: (threads.add(threading.current_thread().name),
                                                                     read(*a, **k))[1])
    parallel = store.read_keys(keys)
    assert list(parallel) == keys and all(torch.equal(serial[k], parallel[k]) for k in keys)
    assert all(name.startswith("qopt-read") for name in threads) and store.reads[keys[0]] == 2
    assert store.bytes_read == 2 * sum(store.nbytes(k) for k in keys)


# -- layers stored in host RAM, run on the main device ---------------------------------------------------------
HOST = {**HALF_ON_DISK, "model.decoder.layers.1": "host", "model.decoder.layers.3": "host"}
MIXED = {**HALF_ON_DISK, "model.decoder.layers.1": "host"}  # layer 1 in host RAM, layer 3 on disk


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_host_layers_compute_what_the_in_memory_model_computes(checkpoint, tmp_path, quantization):
    """On this CPU-only machine the main device is the CPU, so this checks the storing, rebuilding and hooks;
    on a GPU machine the same hooks copy the layers to the GPU (tests/test_gpu.py)."""
    model = load(checkpoint, tmp_path, quantization, device_map=HOST)
    in_memory = load(checkpoint, tmp_path, quantization, device_map=None)
    store = model._qopt_host
    assert sorted(layer_hooks(model)) == [1, 3] and not hasattr(model, "_qopt_offloaded")
    assert {k.split(".")[3] for k in store} == {"1", "3"}  # only the host layers' tensors live there
    assert model.model.decoder.layers[1].fc1.weight.device.type == "meta"  # nothing resident between forwards
    ids = IDS[:40][None]
    # no grad, as generate and eval run: a CPU model is in the kernel's layout from load, while a host layer is
    # rebuilt in the standard one each forward, which bitsandbytes repacks only for inputs without grad
    with torch.no_grad():
        for _ in range(2):  # a second forward rebuilds from the same stored tensors (nothing consumed or repacked)
            torch.testing.assert_close(model(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
    streamed = evaluate_ids(model, IDS, 32, progress=False, micro_batch=3)
    assert streamed.streaming["mode"] == "layer-major" and streamed.streaming["bytes_read"] == 0
    assert streamed.streaming["host_bytes_copied"] == sum(t.numel() * t.element_size() for t in store.values())
    assert streamed.nll == pytest.approx(evaluate_ids(in_memory, IDS, 32, progress=False).nll, rel=1e-6)


def test_host_and_disk_layers_together_stream_generate_and_save(checkpoint, tmp_path):
    model = load(checkpoint, tmp_path, "nf4", device_map=MIXED)
    in_memory = load(checkpoint, tmp_path, "nf4", device_map=None)
    assert sorted(layer_hooks(model)) == [1, 3] and set(model._qopt_host) and set(model._qopt_offloaded)
    streamed = evaluate_ids(model, IDS, 32, progress=False, micro_batch=4)
    assert streamed.streaming["host_bytes_copied"] > 0 and streamed.streaming["bytes_read"] > 0
    assert streamed.nll == pytest.approx(evaluate_ids(in_memory, IDS, 32, progress=False).nll, rel=1e-6)
    prompts = [IDS[:5].tolist(), IDS[5:12].tolist()]
    many = qopt.generate_many(model, prompts, batch_size=2, max_new_tokens=6, progress=False)
    alone = [in_memory.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0].tolist() for p in prompts]
    assert [list(m) for m in many] == alone
    model.save_pretrained(tmp_path / "saved")  # host and disk layers are read back from where they live
    again = qopt.load(tmp_path / "saved", progress=False)
    with torch.no_grad():  # both through the CPU kernel's packed layout
        torch.testing.assert_close(again(IDS[:40][None]).logits, in_memory(IDS[:40][None]).logits, rtol=0, atol=0)


def test_an_eval_model_called_with_grad_enabled_after_a_no_grad_forward_still_runs(checkpoint, tmp_path):
    """bitsandbytes adds a 4-bit layer's bias in place to its packed CPU kernel's output, which autograd refuses
    once the input requires grad (here: the embeddings do); qopt adds it out of place, to the same values."""
    model = load(checkpoint, tmp_path, "nf4", device_map=None)
    ids = IDS[:20][None]
    with torch.no_grad():
        expected = model(ids).logits  # the first eval forward repacks the 4-bit weights for the CPU kernel
    assert model.get_input_embeddings().weight.requires_grad
    torch.testing.assert_close(model(ids).logits.detach(), expected, rtol=0, atol=0)


def test_stream_from_host_needs_a_gpu_in_the_map_and_only_decoder_layers_go_to_host(checkpoint, tmp_path):
    from qopt.errors import PlanError

    with pytest.raises(PlanError, match="stream_from_host runs layers stored in host RAM on a GPU"):
        qopt.load(checkpoint, device_map=HALF_ON_DISK, offload_folder=tmp_path / "o", stream_from_host=True,
                  progress=False)
    from qopt.place.device_map import host_placement

    planned = host_placement({"model.decoder.embed_tokens": 0, "lm_head": 0, "model.decoder.layers.0": 0,
                              "model.decoder.layers.1": "cpu", "model.decoder.final_layer_norm": "cpu"})
    assert planned["model.decoder.layers.1"] == "host" and planned["model.decoder.final_layer_norm"] == "cpu"
    with pytest.raises(PlanError, match=r"lm_head to host RAM \("):
        qopt.load(checkpoint, device_map={**HOST, "lm_head": "host"}, progress=False)
