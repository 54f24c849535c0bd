"""Perplexity protocol, KL / top-1, weight memory, the precision report and the regression gate."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import qopt
from qopt.cli import main as cli_main
from qopt.evaluation.compare import compare_precisions
from qopt.evaluation.footprint import weight_footprint
from qopt.evaluation.gate import Limits, Measurement, Tolerance, measure, read_baseline, write_baseline
from qopt.evaluation.perplexity import (
    cut_windows,
    describe_windows,
    evaluate_ids,
    evaluate_perplexity,
    text_ids,
    wikitext2_text,
)
from qopt.evaluation.report import ComparisonReport
from qopt.evaluation.verdict import check_baseline
from tests.conftest import save_random_opt

SEQ = 64  # TINY's max_position_embeddings
PREFIX = 20_000  # characters of WikiText-2 used where the full text is not the point


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds a barrier per op (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallVocab:
    """The bundled tokenizer folded into TINY's 1000-token vocabulary, so tiny models read real text."""

    def __init__(self) -> None:
        self.inner = qopt.OPTTokenizer.from_pretrained()

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [i % 1000 for i in self.inner(text)["input_ids"]]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, the same weights loaded by qopt, token ids of a WikiText-2 prefix)."""
    from conftest import make_hf_model

    hf_model = make_hf_model()
    folder = tmp_path_factory.mktemp("tiny")
    hf_model.save_pretrained(folder)
    return hf_model, qopt.load(folder), text_ids(wikitext2_text()[:PREFIX], SmallVocab())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A qopt checkpoint with OPT's real vocabulary (short windows, so cheap) for the commands on WikiText-2."""
    return save_random_opt(tmp_path_factory.mktemp("checkpoint") / "model", num_attention_heads=2,
                           max_position_embeddings=32)


def test_wikitext2_token_and_window_counts():
    ids = text_ids()
    assert ids.numel() == 287_645 and ids[0].item() == 2  # rows joined with "\n\n", leading </s>
    windows = cut_windows(ids.numel(), 2048)
    assert len(windows) == 140 and windows[-1].end == 140 * 2048  # the trailing 1,925 tokens are dropped
    assert sum(w.scored for w in windows) == 140 * 2047
    line = describe_windows(ids.numel(), 2048)
    assert "287,645 tokens" in line and "140 windows of 2048" in line
    assert wikitext2_text().count("\n\n = ") > 0  # headings sit between joined rows


@pytest.mark.parametrize("stride", [64, 32, 17, 1])
def test_windows_score_each_token_at_most_once(stride):
    n = 64 * 5 + 11
    scored = []
    for w in cut_windows(n, 64, stride):
        assert w.end - w.begin == 64  # full windows only
        scored += range(w.begin + w.score_from, w.end)
    if stride == 64:  # GPTQ: 5 windows, the first token of each has no context and is not scored
        assert scored == [t for t in range(5 * 64) if t % 64]
    else:  # sliding: contiguous from token 1, none twice
        assert scored == list(range(1, scored[-1] + 1)) and scored[-1] > n - 1 - stride
    first, later = cut_windows(n, 64, stride)[:2]
    assert first.score_from == 1 and later.score_from == max(1, 64 - stride)


def test_bad_window_settings_are_refused(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="stride 65"):
        cut_windows(1000, 64, 65)
    with pytest.raises(ValueError, match="fewer than one window"):
        cut_windows(10, 64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_perplexity(model, text="hello", seqlen=128, progress=False)


def test_perplexity_equal_on_transformers_and_qopt_models(tiny):
    hf_model, model, ids = tiny
    text = wikitext2_text()[:PREFIX]
    ours = evaluate_perplexity(model, SmallVocab(), text, max_windows=6, progress=False)
    theirs = evaluate_perplexity(hf_model, SmallVocab(), text, max_windows=6, progress=False)
    assert ours.windows == theirs.windows == 6 and ours.tokens == theirs.tokens == 6 * 63
    assert abs(ours.ppl - theirs.ppl) / theirs.ppl < 1e-4 and ours.seqlen == SEQ
    # GPTQ's own formula on transformers' loss: exp(mean over windows of the mean window loss)
    with torch.no_grad():
        losses = [hf_model(ids[i * SEQ:(i + 1) * SEQ][None], labels=ids[i * SEQ:(i + 1) * SEQ][None]).loss
                  for i in range(6)]
    assert abs(math.exp(torch.stack(losses).mean().item()) - ours.ppl) / ours.ppl < 1e-4


def test_stride_mode_matches_the_hf_perplexity_guide(tiny):
    hf_model, model, ids = tiny
    plain = evaluate_ids(model, ids, max_windows=5, progress=False)
    same = evaluate_ids(model, ids, stride=SEQ, max_windows=5, progress=False)
    assert (same.ppl, same.tokens, same.windows) == (plain.ppl, plain.tokens, plain.windows)

    stride, windows = 16, 9
    ours = evaluate_ids(model, ids, stride=stride, max_windows=windows, progress=False)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0  # the guide's loop, full windows only
    with torch.no_grad():
        for begin in range(0, stride * windows, stride):
            end = begin + SEQ
            trg_len = end - prev_end
            input_ids = ids[begin:end][None]
            target = input_ids.clone()
            target[:, :-trg_len] = -100
            scored = (target[:, 1:] != -100).sum().item()  # the guide's "valid - 1" is exact only at first
            nll_sum += hf_model(input_ids, labels=target).loss.item() * scored
            n_tokens += scored
            prev_end = end
    assert ours.tokens == n_tokens == 63 + (windows - 1) * stride
    assert abs(ours.ppl - math.exp(nll_sum / n_tokens)) / ours.ppl < 1e-4


def test_kl_and_top1_against_a_reference(tiny):
    _, model, ids = tiny
    itself = evaluate_ids(model, ids, max_windows=3, progress=False, reference=copy.deepcopy(model))
    assert abs(itself.kl) < 1e-6 and itself.top1 == 1.0
    with torch.no_grad():
        noisy = copy.deepcopy(model)
        for p in noisy.model.decoder.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    result = evaluate_ids(noisy, ids, max_windows=3, progress=False, reference=model)
    with torch.no_grad():  # brute force over all logits at once
        kl, agree, n = 0.0, 0, 0
        for i in range(3):
            window = ids[i * SEQ:(i + 1) * SEQ][None]
            p = model(window).logits[0, :-1].float().log_softmax(-1)
            q = noisy(window).logits[0, :-1].float().log_softmax(-1)
            kl += (p.exp() * (p - q)).sum().item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
            n += SEQ - 1
    assert result.kl > 1e-4 and abs(result.kl - kl / n) < 1e-6 * max(1.0, kl / n)
    assert result.top1 == pytest.approx(agree / n)


def test_weight_footprint_of_unquantized_models(tiny):
    _, model, _ = tiny
    unique = sum(p.numel() for p in model.parameters())  # the tied lm_head counts once
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head)
    for dtype, bits in ((torch.float32, 32), (torch.bfloat16, 16)):
        foot = weight_footprint(copy.deepcopy(model).to(dtype))
        assert foot.bytes == unique * bits // 8 and foot.params == unique
        assert foot.bits_per_param == bits and foot.linear_bits_per_param == bits
        assert foot.linear_params == linear and foot.linear_layers == 2 * 6


def _bnb_layers(kind: str) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(128, 64).to(torch.bfloat16)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
    else:
        layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=kind == "nf4-dq", quant_storage=torch.uint8)
    layer.load_state_dict(dense.state_dict())
    return nn.Sequential(layer.to("cpu")).eval()


N = 64 * 128  # weights in the layer above; NF4 blocks of 64, one fp32 code book of 16 values
EXPECTED_BYTES = {  # (before the first forward, after it) per bitsandbytes' formats, bias excluded
    "nf4": (N // 2 + 4 * N // 64 + 64, N // 2 + 2 * N // 64 + 64),  # fp32 absmax, then bf16 after the repack
    # uint8 absmax + fp32 offset + nested fp32 absmax (one block of 256) + its 256-entry fp32 code book;
    # the repack dequantizes the statistics to bf16 and drops the nested ones
    "nf4-dq": (N // 2 + N // 64 + 4 + 64 + 4 + 1024, N // 2 + 2 * N // 64 + 64 + 4),
    "int8": (N + 4 * 64, N + 4 * 64),  # int8 weight + fp32 row scales (SCB); CB aliases the weight
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_BYTES))
def test_weight_footprint_of_quantized_layers_in_both_states(kind):
    layers = _bnb_layers(kind)
    for state, expected in zip(("as loaded", "after a forward"), EXPECTED_BYTES[kind], strict=True):
        foot = weight_footprint(layers)
        bias = layers[0].bias.numel() * layers[0].bias.element_size()
        assert (state, foot.linear_bytes) == (state, expected)
        assert foot.bytes == expected + bias and foot.linear_params == N and foot.params == N + 64
        assert foot.linear_bits_per_param == pytest.approx(8 * expected / N)
        with torch.no_grad():
            layers(torch.randn(2, 128, dtype=torch.bfloat16))


def test_compare_precisions_report_json_and_plot(checkpoint, tmp_path):
    report = compare_precisions(checkpoint, ("nf4", "fp32", "int8"), max_windows=3, progress=False)
    assert [r.precision for r in report.rows] == ["fp32", "bf16", "nf4", "int8"]  # references first, bf16 added
    fp32, bf16, nf4, int8 = report.rows
    assert (report.windows, report.tokens, report.total_tokens) == (3, 3 * 31, 287_645)
    assert fp32.reference is None and bf16.reference == "fp32" and int8.reference == nf4.reference == "bf16"
    for row in (bf16, int8, nf4):
        assert row.delta == pytest.approx(row.ppl - report.row(row.reference).ppl)
        assert 0 <= row.kl < 0.05 and 0 < row.top1 <= 1
    assert nf4.kl > int8.kl  # 4 bits lose more than 8
    assert fp32.weight_bytes == 2 * bf16.weight_bytes > 2 * int8.weight_bytes > 2 * nf4.weight_bytes
    assert (fp32.linear_bits_per_param, bf16.linear_bits_per_param) == (32, 16)
    assert 8 < int8.linear_bits_per_param < 9.5 and 4 < nf4.linear_bits_per_param < 6  # + scales, absmax
    table = report.to_markdown().splitlines()
    assert len(table) == 6 and table[2].startswith("| fp32 |") and "| bf16 |" in table[4]
    report.save_json(tmp_path / "out" / "report.json")
    report.save_plot(tmp_path / "out" / "plot.png")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["rows"][2]["precision"] == "nf4" and data["settings"]["windows"] == 3
    assert (tmp_path / "out" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pre_quantized_checkpoint_is_measured_as_saved(checkpoint, tmp_path, capsys):
    from qopt.loading.loader import quantize_checkpoint

    quantize_checkpoint(checkpoint, tmp_path / "nf4", "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        compare_precisions(tmp_path / "nf4", ("fp32",), max_windows=1, progress=False)
    assert cli_main(["eval", str(tmp_path / "nf4"), "--windows", "1"]) == 0
    assert "| nf4 |" in capsys.readouterr().out


def _edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _row(data: dict, precision: str) -> dict:
    return next(r for r in data["rows"] if r["precision"] == precision)


@pytest.fixture(scope="module")
def gate_baseline(checkpoint, tmp_path_factory):
    """A format-2 baseline of fp32, bf16 and NF4 on 2 windows, and the report of the same run."""
    folder = tmp_path_factory.mktemp("gate")
    assert cli_main(["eval", str(checkpoint), "--windows", "2", "--precisions", "fp32", "bf16", "nf4",
                     "--write-baseline", str(folder / "gate.json"), "--tolerance", "0.01",
                     "--json", str(folder / "run.json")]) == 0
    return folder / "gate.json", ComparisonReport.from_dict(json.loads((folder / "run.json").read_text()))


def test_a_baseline_records_tolerances_digests_and_data_files(checkpoint, gate_baseline, capsys):
    path, _ = gate_baseline
    baseline = read_baseline(path)
    assert baseline.format == 2 and baseline.tolerance == Tolerance(Limits(ppl=0.01))
    assert set(baseline.digests) == {"fp32", "bf16", "nf4"} and baseline.noise is None
    assert set(baseline.files["text"]) == {"wiki.test.raw"} and set(baseline.files["tokenizer"]) == {"vocab.json",
                                                                                                      "merges.txt"}
    assert baseline.digests["fp32"]["state_dict"] != baseline.digests["bf16"]["state_dict"]
    assert cli_main(["eval", str(checkpoint), "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "passed, 16 checks within tolerance" in out and "not checked" not in out  # 3 data + 3 + 5 + 5


def test_gate_checks_each_measure_both_ways(gate_baseline):
    path, report = gate_baseline
    baseline = read_baseline(path)
    run = Measurement(report, copy.deepcopy(baseline.digests), baseline.files)
    nf4 = baseline.report.row("nf4")
    cases = [("ppl", nf4.ppl * 1.009, []), ("ppl", nf4.ppl * 0.989, ["perplexity"]), ("ppl", math.nan, ["perplexity"]),
             ("kl", nf4.kl * 1.049, []), ("kl", nf4.kl * 0.949, ["kl"]), ("kl", nf4.kl * 1.051, ["kl"]),
             ("top1", nf4.top1 + 0.0014, []), ("top1", nf4.top1 - 0.0016, ["top1"])]
    for field_name, value, failing in cases:
        measured = copy.deepcopy(run)
        setattr(measured.report.row("nf4"), field_name, value)
        verdict = check_baseline(measured, baseline)
        assert [c.measure for c in verdict.failures] == failing, (field_name, value)
        assert all(c.precision == "nf4" for c in verdict.failures)
    measured = copy.deepcopy(run)
    measured.digests["nf4"]["modules"] = "0" * 64
    failure, = check_baseline(measured, baseline).failures
    assert (failure.precision, failure.measure, failure.cells[2]) == ("nf4", "modules", "differs")
    assert check_baseline(measured, baseline, baseline.tolerance.override(digests=())).passed
    measured.report.rows.pop()
    failure, = check_baseline(measured, baseline).failures
    assert (failure.precision, failure.measure) == ("nf4", "measured")


def test_gate_failure_prints_a_table_and_command_line_tolerances_override(checkpoint, gate_baseline, tmp_path,
                                                                          capsys):
    path = tmp_path / "gate.json"
    path.write_text(gate_baseline[0].read_text())
    nf4 = _row(json.loads(path.read_text()), "nf4")
    _edit(path, lambda d: _row(d, "nf4").update(ppl=nf4["ppl"] * 1.05, kl=nf4["kl"] * 1.2, top1=nf4["top1"] - 0.01))
    check = ["eval", str(checkpoint), "--check", str(path)]
    assert cli_main(check + ["--json", str(tmp_path / "verdict.json")]) == 1
    out = capsys.readouterr().out
    assert "| precision | measure | baseline | now | change | allowed |" in out
    assert f"| nf4 | perplexity | {nf4['ppl'] * 1.05:.4f} | {nf4['ppl']:.4f} | -4.762% | ±1.00% |" in out
    assert "| nf4 | KL (nats/token) |" in out and "-16.7% | ±5.0% |" in out
    assert "| nf4 | top-1 agreement |" in out and "+1.00 pt | ±0.15 pt |" in out
    assert "FAILED, 3 of 16 checks beyond tolerance" in out
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert (verdict["passed"], verdict["exit_code"], verdict["failures"]) == (False, 1, 3)
    assert {(c["precision"], c["measure"]) for c in verdict["checks"] if not c["passed"]} == {
        ("nf4", "perplexity"), ("nf4", "kl"), ("nf4", "top1")}
    assert verdict["measured"]["rows"][-1]["precision"] == "nf4" and verdict["unchecked"] == []
    # --tolerance used to be ignored with --check; each flag overrides the baseline's limit for every precision
    assert cli_main(check + ["--tolerance", "0.06", "--kl-tolerance", "0.25"]) == 1
    assert "FAILED, 1 of 16" in capsys.readouterr().out
    assert cli_main(check + ["--tolerance", "0.06", "--kl-tolerance", "0.25", "--top1-tolerance", "1.1"]) == 0
    capsys.readouterr()


def test_gate_data_files_and_token_counts(checkpoint, gate_baseline, tmp_path, capsys):
    path = tmp_path / "gate.json"
    path.write_text(gate_baseline[0].read_text())
    _edit(path, lambda d: d["data"].update(total_tokens=d["data"]["total_tokens"] + 1))
    assert cli_main(["eval", str(checkpoint), "--check", str(path), "--json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "| data | text tokens | 287,646 | 287,645 | -1 | equal |" in out
    assert "not checked: all of fp32, bf16, nf4: the text gives other token counts" in out
    path.write_text(gate_baseline[0].read_text())
    _edit(path, lambda d: d["files"]["tokenizer"].update({"merges.txt": "0" * 64}))
    assert cli_main(["eval", str(checkpoint), "--check", str(path), "--json", str(tmp_path / "v.json")]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "tokenizer file merges.txt" in err
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["exit_code"] == 2 and "merges.txt" in verdict["error"]
    assert cli_main(["eval", str(checkpoint), "--check", str(tmp_path / "missing.json")]) == 2
    assert "no such baseline file" in capsys.readouterr().err


def test_gate_runs_a_subset_of_the_baseline(checkpoint, gate_baseline, capsys):
    path, _ = gate_baseline
    assert cli_main(["eval", str(checkpoint), "--check", str(path), "--precisions", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" not in out and "| bf16 |" in out and "| nf4 |" in out  # bf16 added as nf4's reference
    assert "not checked: all of fp32: not run (--precisions)" in out
    assert "not checked: KL (nats/token) of bf16: its reference (fp32) was not run" in out
    assert cli_main(["eval", str(checkpoint), "--check", str(path), "--precisions", "fp4"]) == 2
    assert "fp4 not in the baseline" in capsys.readouterr().err


def test_a_format_1_baseline_still_loads_and_says_what_it_cannot_check(checkpoint, gate_baseline, tmp_path,
                                                                        capsys):
    path = tmp_path / "old.json"
    path.write_text(gate_baseline[0].read_text())
    _edit(path, lambda d: [d.pop("files"), d.pop("digests"), d.update(format=1, tolerance={"relative": 0.01})])
    baseline = read_baseline(path)
    assert baseline.format == 1 and baseline.files is None and baseline.digests == {}
    assert baseline.tolerance == Tolerance(Limits(ppl=0.01, kl=None, top1=None, digests=()))
    assert cli_main(["eval", str(checkpoint), "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not checked: data files" in out and "not checked: KL (nats/token) of bf16, nf4: no KL tolerance" in out
    assert "not checked: digest of fp32, bf16, nf4: not recorded in the baseline (format 1)" in out
    assert "passed, 6 checks" in out  # 3 data + 3 perplexities
    assert cli_main(["eval", str(checkpoint), "--check", str(path), "--kl-tolerance", "0.05",
                     "--top1-tolerance", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "passed, 10 checks" in out and "not checked: KL" not in out
    # the full-split baseline shipped in format 1 still reads
    from pathlib import Path

    full = read_baseline(Path(__file__).parents[1] / "evals" / "baselines" / "wikitext2_full.json")
    assert full.format == 1 and full.tolerance.max_gap_ratio == 0.5


def test_gate_refuses_conflicting_settings_and_bad_files(checkpoint, tmp_path, capsys):
    folder = checkpoint
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "tolerance": {"relative": 0.01}}))
    assert cli_main(["eval", str(folder), "--check", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    bad.write_text(json.dumps({"format": 3}))
    assert cli_main(["eval", str(folder), "--check", str(bad)]) == 2
    assert "expected 1 or 2" in capsys.readouterr().err
    assert cli_main(["eval", str(folder), "--check", str(bad), "--seqlen", "32"]) == 2
    assert "drop --seqlen" in capsys.readouterr().err
    assert cli_main(["eval", str(folder), "--windows", "1", "--kl-tolerance", "0.1"]) == 2
    assert "use with --check or --write-baseline" in capsys.readouterr().err
    assert cli_main(["eval", str(folder), "--bits", "8", "--quant-type", "fp4"]) == 2
    with pytest.raises(ValueError, match="top-1 tolerance"):
        Limits(top1=0)
    tolerance = Tolerance.from_dict({"default": {"ppl_relative": 0.01}, "precisions": {"nf4": {"top1_points": 0.5}}})
    assert tolerance.limits("nf4") == Limits(ppl=0.01, top1=0.5) and tolerance.limits("int8") == Limits(ppl=0.01)
    assert tolerance.override(ppl=0.02).limits("nf4") == Limits(ppl=0.02, top1=0.5)


def _model_with_outlier_features(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A bf16 tiny OPT whose Linear inputs carry a few huge hidden dimensions, and text sampled from it.

    Pre-LN layer-norm weights of 3 dimensions are scaled x60 (the emergent outlier features of LLM.int8) and the
    input columns of the Linear layers that read them /4, so the model stays well-behaved in full precision;
    a peaky embedding and x4 weights give it a sharp distribution, so damage shows in its perplexity.
    """
    torch.manual_seed(seed)
    config = qopt.OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                            num_attention_heads=4, max_position_embeddings=SEQ, dropout=0.0)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    outliers = [3, 17, 42]
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(15)
        for layer in model.model.decoder.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(4)
            attn = layer.self_attn
            for norm, readers in ((layer.self_attn_layer_norm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.final_layer_norm, (layer.fc1,))):
                norm.weight[outliers] *= 60
                for linear in readers:
                    linear.weight[:, outliers] /= 4
        ids = torch.full((16, 1), 2)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(SEQ - 1):
            probs = model(ids, use_cache=False).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return model.eval().to(torch.bfloat16), ids.reshape(-1)


def test_llm_int8_threshold_keeps_outlier_features_in_higher_precision():
    from qopt.quant.config import QuantizationConfig
    from qopt.quant.modules import quantize_model

    reference, ids = _model_with_outlier_features()
    full = evaluate_ids(reference, ids, progress=False)
    runs = {}
    for threshold in (6.0, 0.0):
        int8 = quantize_model(copy.deepcopy(reference), QuantizationConfig(load_in_8bit=True,
                                                                           llm_int8_threshold=threshold))
        runs[threshold] = evaluate_ids(int8, ids, progress=False, reference=reference)
    mixed, pure = (runs[t].ppl / full.ppl - 1 for t in (6.0, 0.0))
    assert abs(mixed) < 0.02, f"threshold 6: perplexity {runs[6.0].ppl:.2f} vs bf16 {full.ppl:.2f}"
    assert pure > 0.05 and pure > 4 * abs(mixed), f"threshold 0: {runs[0.0].ppl:.2f} vs bf16 {full.ppl:.2f}"
    assert runs[0.0].kl > 4 * runs[6.0].kl and runs[0.0].top1 < runs[6.0].top1


def test_one_precision_from_bits_and_quant_type(checkpoint, capsys):
    assert cli_main(["eval", str(checkpoint), "--bits", "4", "--quant-type", "fp4", "--double-quant",
                     "--windows", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("| fp4-dq |") and out.count("\n| ") == 2  # alone: no reference row
    assert "1 window of 32" in out and "31 scored tokens" in out
    assert cli_main(["eval", str(checkpoint), "--precisions", "fp32", "int4"]) == 2
    assert "'int4'" in capsys.readouterr().err
    assert cli_main(["eval", str(checkpoint), "--compare", "--bits", "4"]) == 2


def test_calibrated_and_round_to_nearest_are_judged_in_one_run(checkpoint, tmp_path, capsys):
    """A "-calibrated" precision is GPTQ-rounded at load; same format and bytes as its preset, less drift."""
    report = compare_precisions(checkpoint, ("nf4", "nf4-calibrated"), max_windows=3, progress=False)
    assert [r.precision for r in report.rows] == ["bf16", "nf4", "nf4-calibrated"]
    rtn, calibrated = report.row("nf4"), report.row("nf4-calibrated")
    assert calibrated.reference == "bf16" and calibrated.weight_bytes == rtn.weight_bytes
    assert calibrated.kl < rtn.kl
    assert f"nf4-calibrated: gap {calibrated.delta:+.3f} vs round-to-nearest {rtn.delta:+.3f}" in report.to_markdown()
    report.save_json(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text()).get("gap_ratios", {})
    assert {k: tuple(v.values()) for k, v in saved.items()} == report.gap_ratios()  # the ratio math: next test
    assert cli_main(["eval", str(checkpoint), "--precisions", "int4-calibrated"]) == 2
    assert "int4" in capsys.readouterr().err


def test_gate_keeps_the_calibrated_gap_ratio_claim(checkpoint, tmp_path, capsys):
    run = measure(checkpoint, ("nf4", "nf4-calibrated"), max_windows=2, progress=False)
    report = run.report
    rtn = report.row("nf4")
    rtn.delta = 0.2  # a known round-to-nearest gap, so the ratio below is set by the test
    report.row("nf4-calibrated").delta = 0.18
    assert report.gap_ratios()["nf4-calibrated"][0] == pytest.approx(0.9)
    write_baseline(run, tmp_path / "b.json", Tolerance(Limits(ppl=0.01), max_gap_ratio=0.5))
    baseline = read_baseline(tmp_path / "b.json")
    assert baseline.tolerance == Tolerance(Limits(ppl=0.01), max_gap_ratio=0.5)
    assert baseline.report.gap_ratios() == report.gap_ratios()
    failure, = check_baseline(run, baseline).failures
    assert (failure.precision, failure.measure, failure.cells[1]) == ("nf4-calibrated", "gap_ratio",
                                                                      "0.90 (+0.1800 / +0.2000)")
    assert check_baseline(run, baseline, Tolerance(Limits(ppl=0.01), max_gap_ratio=0.95)).passed
    rtn.delta = -0.1  # round-to-nearest below the reference: no ratio to report or check
    assert report.gap_ratios() == {} and "no ratio" in report.to_markdown()
    failure, = check_baseline(run, baseline).failures
    assert "round-to-nearest shows no positive gap" in failure.cells[2]
    with pytest.raises(ValueError, match="needs a calibrated precision"):
        write_baseline(measure(checkpoint, ("bf16",), max_windows=1, progress=False), tmp_path / "c.json",
                       Tolerance(max_gap_ratio=0.5))
    assert cli_main(["eval", str(checkpoint), "--check", str(tmp_path / "b.json"), "--max-gap-ratio", "1"]) == 2
    assert "--max-gap-ratio" in capsys.readouterr().err
    assert cli_main(["eval", str(checkpoint), "--precisions", "nf4", "--max-gap-ratio", "0.5"]) == 2
    assert "use it with --write-baseline" in capsys.readouterr().err
