"""Plan and load place the same map: `qopt.plan`'s device map against real loads over a sweep of CPU + disk
budgets, against the map `qopt generate` reports after pasting the plan's `load with:` line, and against the map
`load` computes for GPU splits (on the meta device, GPUs stood in for)."""
import logging
import re

import pytest
import torch
from conftest import save_random_opt

import qopt
from qopt import cli
from qopt.loading.loader import placed_model
from qopt.place.device_map import summarize
from qopt.place.plan import config_for, plan
from qopt.quant.config import QuantizationConfig

MIB = 2**20
SHAPE = dict(num_hidden_layers=6, hidden_size=256, ffn_dim=2048, num_attention_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_opt(tmp_path_factory.mktemp("opt6"), **SHAPE)


def _fitting_budget(checkpoint, batch: int) -> int:
    """The smallest CPU budget (in quarter MiB) at which the model fits whole: the sweeps go below it, so they do
    not depend on this CPU's layout terms (AVX512-BF16 or not)."""
    budget = plan(checkpoint, 4, {"cpu": 1 << 40}, context=96, batch=batch).used_bytes("cpu")  # a lower bound
    while not plan(checkpoint, 4, {"cpu": budget}, context=96, batch=batch).fits:
        budget += MIB // 4
    return budget


def _layers_on(device_map, device):
    return sorted(int(n.rsplit(".", 1)[1]) for n, d in device_map.items() if d == device and ".layers." in n)


def test_real_loads_place_the_plans_map_over_a_sweep_of_cpu_budgets(checkpoint, tmp_path):
    seen = set()
    full = _fitting_budget(checkpoint, 2)
    for below in (1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0, -4.0):  # below 1.5 MiB nothing but layers fits
        memory = {"cpu": full - int(below * MIB)}
        result = plan(checkpoint, 4, memory, context=96, batch=2)
        model = qopt.load(checkpoint, quantization="nf4", device_map="auto", max_memory=memory, context=96, batch=2,
                          offload_folder=tmp_path / "offload", progress=False)
        assert model.hf_device_map == result.device_map, memory
        assert result.loadable and all(result.used_bytes(d) <= limit for d, limit in result.limits.items())
        seen.add(len(_layers_on(result.device_map, "disk")))
    assert len(seen) >= 3  # the sweep crosses several splits, from most layers on disk to none


def test_a_larger_budget_never_turns_a_loadable_plan_into_cannot_load(checkpoint):
    full = _fitting_budget(checkpoint, 2)
    for strategy in ("auto", "sequential"):
        loadable = False
        for budget in range(full - 5 * MIB, full + MIB, MIB // 4):
            result = plan(checkpoint, 4, {"cpu": budget}, context=96, batch=2, strategy=strategy)
            assert result.loadable or not loadable, (strategy, budget, result.verdict)
            loadable = result.loadable
        assert loadable


def test_the_disk_layers_kv_cache_is_reserved_on_the_cpu_in_float32(checkpoint):
    result = plan(checkpoint, 4, {"cpu": _fitting_budget(checkpoint, 2) - MIB}, context=96, batch=2)
    disk = _layers_on(result.device_map, "disk")
    assert disk and result.kv_dtype == torch.float32
    config = config_for(checkpoint)[0]
    per_layer = 2 * 2 * 96 * config.hidden_size * 4  # keys and values, batch 2, float32
    assert result.kv_cache_bytes == {"cpu": config.num_hidden_layers * per_layer}  # every layer's cache on the CPU
    assert result.used_bytes("cpu") <= result.limits["cpu"]


def test_pasting_load_with_into_qopt_generate_places_the_plans_map(checkpoint, tmp_path, capsys, caplog):
    budget = _fitting_budget(checkpoint, 1) - MIB
    assert cli.main(["plan", str(checkpoint), "--cpu", f"{budget // 1024}KiB", "--context", "96"]) == 0
    out = capsys.readouterr().out
    planned = re.search(r"^device map: (.*)$", out, re.M).group(1)
    flags = re.search(r"^load with: (.*)$", out, re.M).group(1)
    assert "--bits 4 --quant-type nf4" in flags and "--context 96" in flags and "disk" in planned
    flags = flags.replace("DIR", str(tmp_path / "offload"))
    with caplog.at_level(logging.INFO, logger="qopt.loading.loader"):
        assert cli.main(["generate", str(checkpoint), "Hello", "--max-new-tokens", "2", *flags.split()]) == 0
    placed = next(r.getMessage() for r in caplog.records if "placement:" in r.getMessage())
    assert placed.endswith("placement: " + planned)


def test_a_plan_object_loads_as_its_map(checkpoint, tmp_path):
    result = plan(checkpoint, 4, {"cpu": _fitting_budget(checkpoint, 2) - MIB}, context=96, batch=2)
    assert "disk" in result.device_map.values()
    model = qopt.load(checkpoint, quantization="nf4", device_map=result, offload_folder=tmp_path, progress=False)
    assert model.hf_device_map == result.device_map
    other = plan("opt-125m", 4, {0: "100MiB", "cpu": "1GiB"}, context=128)  # layers on GPU 0 and the CPU
    with pytest.raises(qopt.errors.PlanError, match="places 12 decoder layers, config.json declares 6"):
        qopt.load(checkpoint, quantization="nf4", device_map=other, progress=False)


@pytest.mark.parametrize("memory, context", [
    ({0: "12GiB", "cpu": "32GiB"}, 2048),  # the 30B / 12 GiB case: layers 0-26 on the GPU, not 0-32
    ({0: "24GiB", "cpu": "8GiB"}, 2048),
    ({0: "10GiB", 1: "10GiB", "cpu": "4GiB"}, 1024),
])
def test_gpu_splits_on_the_meta_device_match_the_loaders_map(memory, context):
    config, _ = config_for("opt-30b")
    result = plan("opt-30b", 4, memory, context=context)
    _, dtype, placed = placed_model(config, QuantizationConfig.from_name("nf4"), "auto", "auto", memory, context, 1)
    assert placed == result.device_map and dtype == result.dtype
    assert all(result.used_bytes(d) <= limit for d, limit in result.limits.items())
    if memory == {0: "12GiB", "cpu": "32GiB"}:
        assert _layers_on(placed, 0) == list(range(27))
        _, _, unreserved = placed_model(config, QuantizationConfig.from_name("nf4"), "auto", "auto", memory, None, None)
        assert len(_layers_on(unreserved, 0)) > 27  # without a budget nothing is reserved (as transformers)


def test_the_1_3b_budgets_of_the_issue_agree_between_plan_and_load():
    config, _ = config_for("opt-1.3b")
    verdicts = []
    for cpu in ("300MiB", "400MiB", "500MiB", "600MiB", "700MiB", "800MiB"):
        result = plan("opt-1.3b", 4, {"cpu": cpu}, context=512)
        _, _, placed = placed_model(config, QuantizationConfig.from_name("nf4"), "auto", "auto", {"cpu": cpu}, 512, 1)
        assert placed == result.device_map, cpu
        verdicts.append(result.loadable)
    assert verdicts == sorted(verdicts) and verdicts[-1]  # once loadable, loadable with more memory
    assert "; ".join(summarize(placed)).startswith("cpu: model.decoder.embed_tokens")


def test_default_context_is_capped_at_the_models_positions():
    assert plan("opt-125m", 4, {"cpu": "1GiB"}).context == 2048
    bundled = qopt.bundled.bundled_model_dir()
    assert plan(bundled, 4, {"cpu": "1GiB"}).context == config_for(bundled)[0].max_position_embeddings


def test_the_cpu_layout_and_packed_head_terms_are_what_a_cpu_model_holds(checkpoint):
    from qopt.generation.lean_forwards import PACK_HEAD_MIN_TOKENS, PACKED_HEAD_ATTRIBUTE
    from qopt.quant import internals
    from qopt.quant.modules import cpu_repacks

    result = plan(checkpoint, 4, {"cpu": "1GiB"}, context=96)
    model = qopt.load(checkpoint, quantization="nf4", device_map="auto", max_memory={"cpu": "1GiB"}, context=96,
                      progress=False)
    model.generate(torch.tensor([[2, 100, 200]]), max_new_tokens=PACK_HEAD_MIN_TOKENS)
    packed = [m.weight.quant_state for m in model.modules() if internals.is_cpu_packed(
        getattr(getattr(m, "weight", None), "quant_state", None))]
    assert result.cpu_layout_bytes == sum(s.absmax.numel() * s.absmax.element_size() for s in packed)
    assert bool(packed) == cpu_repacks()
    _, head = getattr(model.lm_head, PACKED_HEAD_ATTRIBUTE)
    assert result.packed_head_bytes == internals.onednn_nbytes(head) > 0
    assert result.used_bytes("cpu") == sum(result.weight_bytes.values()) + result.kv_cache_bytes["cpu"] + \
        result.activation_bytes + result.cpu_layout_bytes + result.packed_head_bytes


def test_plan_creates_a_missing_offload_folder_and_says_when_a_folder_shadows_a_size_name(
        checkpoint, tmp_path, capsys, caplog, monkeypatch):
    folder = tmp_path / "new" / "offload"
    budget = _fitting_budget(checkpoint, 1) - MIB
    assert cli.main(["plan", str(checkpoint), "--cpu", f"{budget // 1024}KiB", "--context", "96",
                     "--offload-folder", str(folder)]) == 0
    assert folder.is_dir() and f"created offload folder {folder}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opt-125m").symlink_to(checkpoint)
    with caplog.at_level(logging.WARNING, logger="qopt.place.plan"):
        shadowed = plan("opt-125m", 4, {"cpu": "1GiB"}).parameters
    assert "a folder of that name is here: planning it, not the built-in shape" in caplog.text
    monkeypatch.chdir(folder)
    assert shadowed < plan("opt-125m", 4, {"cpu": "1GiB"}).parameters  # elsewhere: the built-in 125M shape


def test_perplexity_reserves_what_scoring_a_window_holds(checkpoint, monkeypatch):
    """`all_logits` (eval) reserves the window's logits and one chunk of fp32 log-probabilities: the logits a
    forward returns and the chunk perplexity scores, measured on the loaded model."""
    from qopt.evaluation import perplexity
    from qopt.place.sizes import LOGIT_CHUNK_ROWS, scoring_bytes

    config = config_for(checkpoint)[0]
    generating = plan(checkpoint, 4, {"cpu": "1GiB"}, context=96)
    scoring = plan(checkpoint, 4, {"cpu": "1GiB"}, context=96, all_logits=True)
    assert scoring.activation_bytes - generating.activation_bytes == \
        scoring_bytes(config, 96, scoring.dtype) - config.vocab_size * 4
    model = qopt.load(checkpoint, quantization="nf4", device_map=scoring, progress=False)
    logits = model(torch.randint(4, 100, (1, 96))).logits
    held = logits.numel() * logits.element_size()
    chunks = []
    real = torch.nn.functional.log_softmax
    monkeypatch.setattr(perplexity.F, "log_softmax", lambda x, dim: chunks.append(x) or real(x, dim=dim))
    perplexity._Totals().add_window(logits[0, :-1], torch.randint(4, 100, (95,)), None)
    chunk = chunks[0].numel() * 4 * (1 + (logits.dtype != torch.float32))  # its fp32 copy (if any) and log-probs
    assert chunks[0].shape[0] == min(LOGIT_CHUNK_ROWS, 95)
    assert scoring_bytes(config, 96, scoring.dtype) >= held + chunk
    assert scoring_bytes(config, 96, scoring.dtype) - (held + chunk) <= 2 * config.vocab_size * 4  # one row each


def test_qopt_eval_places_the_plan_for_scoring(checkpoint, tmp_path, caplog):
    """Scoring a window keeps its logits: at a budget where that moves layers to disk, `qopt eval` places the
    map of `plan(..., all_logits=True)`, not the generation plan's (both in bf16, as `--bits 4` computes here)."""
    def planned(cpu, **kwargs):
        return plan(checkpoint, 4, {"cpu": cpu}, context=96, dtype=torch.bfloat16, **kwargs)

    budget = planned(1 << 40).used_bytes("cpu")
    while not planned(budget).fits:
        budget += MIB // 4
    budget += planned("1GiB", all_logits=True).activation_bytes - planned("1GiB").activation_bytes - MIB
    scoring = planned(budget, all_logits=True)  # generation still fits whole; scoring needs the disk
    assert _layers_on(scoring.device_map, "disk") and not _layers_on(planned(budget).device_map, "disk")
    with caplog.at_level(logging.INFO, logger="qopt.loading.loader"):
        assert cli.main(["eval", str(checkpoint), "--bits", "4", "--seqlen", "96", "--windows", "1", "--device-map",
                         "auto", "--max-memory", f"cpu={budget}", "--offload-folder", str(tmp_path / "offload")]) == 0
    placed = next(r.getMessage() for r in caplog.records if "placement:" in r.getMessage())
    assert placed.endswith("placement: " + "; ".join(summarize(scoring.device_map)))


def test_disk_layers_read_ahead_are_reserved_in_the_cpus_ram(checkpoint, tmp_path):
    """A CPU computing disk layers holds the ones the prefetcher read ahead beside its weights: the plan keeps
    DEFAULT_PREFETCH_DEPTH layers' bytes free in its budget, the depth the layer-major runner reads with."""
    from qopt.loading.layer_runner import LayerRunner
    from qopt.place.sizes import DEFAULT_PREFETCH_DEPTH

    result = plan(checkpoint, 4, {"cpu": _fitting_budget(checkpoint, 2) - MIB}, context=96, batch=2)
    disk = _layers_on(result.device_map, "disk")
    assert disk and result.read_buffer_bytes == {"cpu": DEFAULT_PREFETCH_DEPTH * result.weight_bytes["disk"]
                                                 // len(disk)}
    assert "disk layers read ahead (in the totals)" in result.format()
    model = qopt.load(checkpoint, quantization="nf4", device_map=result, offload_folder=tmp_path, progress=False)
    assert LayerRunner(model).depth == DEFAULT_PREFETCH_DEPTH
    assert not plan(checkpoint, 4, {"cpu": "1GiB"}, context=96).read_buffer_bytes  # nothing on disk, nothing kept
