"""What a new user hits first on the command line: placement flags, adapters, plan verdicts, sane defaults and
one-line errors. Each test here failed before the CLI was reworked (see the README's CLI section)."""
import json
import subprocess
import sys

import pytest
import torch

import qopt
from qopt.bundled import bundled_model_dir
from qopt.cli import main
from qopt.cli.main import build_parser
from qopt.errors import PlanError
from qopt.place.sizes import DEFAULT_PREFETCH_DEPTH

BUNDLED = str(bundled_model_dir())
HAS_GPU = torch.cuda.is_available()


def run_cli(*args, input=None):
    """`python -m qopt ...` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qopt", *args], capture_output=True, text=True, input=input,
                          timeout=600)


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- placement ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_GPU, reason="checks the error for a GPU this machine lacks")
def test_a_gpu_the_machine_lacks_is_a_one_line_error_in_python_and_on_the_command_line():
    with pytest.raises(PlanError, match=r"cuda:0, but this machine has 0 CUDA devices"):
        qopt.load(BUNDLED, device_map="cuda", progress=False)
    with pytest.raises(PlanError, match=r"cuda:1"):
        qopt.load(BUNDLED, device_map={"": 1}, progress=False)
    one_line_error(run_cli("generate", "Hi", "--device-map", "cuda:0", "--max-new-tokens", "2"),
                   "cuda:0", "0 CUDA devices", "--device-map cpu")


def test_placement_flags_reach_the_loader(tmp_path, capsys):
    """--device-map auto with a --max-memory that leaves room for half the decoder layers offloads the rest
    to --offload-folder, and the generated text equals the all-in-memory run."""
    args = ["generate", "The", "--bits", "4", "--max-new-tokens", "4"]
    assert main(args + ["--device-map", "cpu"]) == 0
    expected = capsys.readouterr().out
    model = qopt.load(BUNDLED, quantization="nf4", progress=False)
    layer = qopt.weight_footprint(model.model.decoder.layers[0]).bytes
    # what the whole model needs with generate's budget (--context 16), less all but two and a half layers,
    # plus the disk layers read ahead, which a CPU computing them holds beside its own
    whole = qopt.plan(BUNDLED, 4, {"cpu": 1 << 40}, context=16).used_bytes("cpu")
    cpu = whole - (len(model.model.decoder.layers) - 2) * layer - layer // 2 + DEFAULT_PREFETCH_DEPTH * layer
    assert "disk" in qopt.plan(BUNDLED, 4, {"cpu": cpu}, context=16).device_map.values()
    assert main(args + ["--device-map", "auto", "--max-memory", f"cpu={cpu}", "--offload-folder",
                        str(tmp_path / "off"), "--context", "16"]) == 0
    assert capsys.readouterr().out == expected
    assert main(args + ["--device-map", "sideways"]) == 2
    assert "--device-map 'sideways'" in capsys.readouterr().err
    assert main(args + ["--device-map", "cpu", "--max-memory", "cpu=1GiB"]) == 2
    assert main(args + ["--max-memory", "gpu0:20GiB"]) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err


def test_default_dtype_is_auto_like_transformers_with_bf16_for_fp16_checkpoints_on_a_cpu():
    config = json.loads((bundled_model_dir() / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    nf4 = qopt.load(BUNDLED, quantization="nf4", progress=False)
    assert nf4.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert 28e6 < qopt.weight_footprint(nf4).bytes < 29e6  # about the README's NF4 row, not 54 MB with fp32 leftovers
    if not HAS_GPU:
        assert qopt.load(BUNDLED, progress=False).dtype == torch.bfloat16
    assert qopt.load(BUNDLED, torch_dtype=None, progress=False).dtype == torch.float32
    assert qopt.load(BUNDLED, torch_dtype="float16", progress=False).dtype == torch.float16


# -- adapters -------------------------------------------------------------------------------------------------
def test_generate_and_eval_apply_an_adapter(adapter, capsys):
    base = ["eval", "--windows", "1", "--bits", "16"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--adapter", str(adapter)]) == 0
    adapted = capsys.readouterr().out
    assert plain.splitlines()[-1] != adapted.splitlines()[-1]  # the perplexity row changed
    model = qopt.load(BUNDLED, torch_dtype="bfloat16", progress=False)
    qopt.load_adapter(model, adapter)
    ppl = qopt.evaluate_perplexity(model, max_windows=1, progress=False).ppl
    assert f"| bf16 | {ppl:.3f} |" in adapted
    gen = ["generate", "Once upon a time", "--max-new-tokens", "8", "--bits", "16"]
    assert main(gen) == 0 and main(gen + ["--adapter", str(adapter)]) == 0
    without, with_adapter = capsys.readouterr().out.splitlines()[-2:]
    assert without != with_adapter


def test_an_adapter_folder_given_as_the_model_gets_a_hint(adapter):
    line = one_line_error(run_cli("generate", str(adapter), "Hi"), "LoRA adapter", "--adapter")
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base in line


# -- plan -----------------------------------------------------------------------------------------------------
def test_plan_verdicts_exit_codes_and_the_flags_that_reproduce_it(capsys):
    assert main(["plan", "opt-66b", "--gpu", "24GiB", "--cpu", "10GiB", "--context", "256"]) == 0
    out = capsys.readouterr().out
    assert "verdict: needs disk: layers " in out and "--offload-folder DIR" in out
    assert main(["plan", "opt-30b", "--gpu", "24GiB"]) == 0  # no --cpu: this machine's RAM, not zero
    out = capsys.readouterr().out
    cpu = [w for w in out.split() if w.startswith("cpu=")][0]
    assert not cpu.startswith("cpu=0") and "verdict: fits: GPU 0" in out
    assert main(["plan", "opt-30b", "--context", "4096"]) == 2
    assert "exceeds opt-30b's max_position_embeddings (2048)" in capsys.readouterr().err
    for size in ("1TiB", "1000000000000", "1tb", "24gb", "24 GiB"):
        assert main(["plan", "opt-125m", "--gpu", size, "--cpu", "0"]) == 0, size
        assert "verdict: fits: GPU 0" in capsys.readouterr().out
    assert main(["plan", "opt-125m", "--gpu", "lots"]) == 2
    assert "1TiB" in capsys.readouterr().err  # the message shows what works


# -- papercuts ------------------------------------------------------------------------------------------------
def test_help_imports_no_torch_and_shows_defaults():
    code = ("import sys; from qopt.cli.main import build_parser; p = build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(p.parse_args(['plan', 'x']).bits)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "4"
    help_text = run_cli("generate", "--help").stdout
    assert "(default: 50)" in help_text and "--adapter" in help_text and "--device-map" in help_text
    for command in ("eval", "finetune", "plan", "quantize", "generate", "info"):
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented, (command, undocumented)


def test_one_flag_vocabulary_with_old_spellings_and_verbose_anywhere():
    parser = build_parser()
    for flag in ("--out", "--output", "-o"):
        assert parser.parse_args(["quantize", flag, "x"]).output == "x"
        assert parser.parse_args(["finetune", "--data", "d", flag, "x"]).output == "x"
    assert parser.parse_args(["finetune", "--data", "d", "-o", "x", "--quantization", "nf4"]).quantization == "nf4"
    assert parser.parse_args(["finetune", "--data", "d", "-o", "x", "--bits", "4"]).bits == 4
    assert parser.parse_args(["plan", "opt-125m", "-v"]).verbose
    assert parser.parse_args(["-v", "plan", "opt-125m"]).verbose


def test_messages_name_the_flags_a_command_line_user_typed(capsys):
    assert main(["eval", "--windows", "0"]) == 2
    assert "--windows 0" in capsys.readouterr().err


def test_a_prompt_past_the_positions_fails_before_the_load_and_the_echo():
    result = run_cli("generate", "Once", "--max-new-tokens", "900")  # past the bundled model's 256 positions
    assert result.returncode == 2 and result.stdout == ""
    one_line_error(result, "positions")


def test_a_closed_pipe_ends_quietly():
    shell = subprocess.run(f"{sys.executable} -m qopt plan opt-66b --gpu 24GiB --cpu 30GiB | head -c 10",
                           shell=True, capture_output=True, text=True)
    assert "Traceback" not in shell.stderr and "Broken pipe" not in shell.stderr, shell.stderr


def test_a_foreign_tokenizer_is_a_one_line_error(tmp_path):
    from tokenizers import Tokenizer, models

    folder = tmp_path / "model"
    folder.mkdir()
    for file in bundled_model_dir().iterdir():
        if file.name in ("config.json", "model.safetensors"):
            (folder / file.name).symlink_to(file)
    Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    one_line_error(run_cli("generate", str(folder), "hello", "--max-new-tokens", "1"), "not an OPT")


def test_output_files_refuse_a_folder_that_cannot_be_made_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(run_cli("eval", "--windows", "1", "--json", str(tmp_path / "file" / "report.json")), "file")


def test_info_names_the_libraries_and_devices():
    out = run_cli("info").stdout
    for name in ("torch", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "CUDA devices"):
        assert name in out, name
