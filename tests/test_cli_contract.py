"""The command line as a contract: exit statuses CI can rely on, options anywhere, flags (never Python keywords)
in every message, arguments checked before the load, load progress, `--version`. Each test here failed before
(see the README's CLI section)."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qopt
from qopt.bundled import bundled_model_dir
from qopt.cli import main
from qopt.cli.main import COMMANDS, build_parser

BUNDLED = str(bundled_model_dir())
README = Path(__file__).resolve().parents[1] / "README.md"


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "qopt", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


# -- exit statuses --------------------------------------------------------------------------------------------
def _module(command):
    return importlib.import_module(f"qopt.cli.{ {'eval': 'evaluate'}.get(command, command)}")


def _minimal(command):
    """Arguments that parse for `command` (the handler is replaced, so nothing runs)."""
    return {"finetune": ["--data", "d", "-o", "o"], "merge": ["b", "a", "-o", "o"], "quantize": ["-o", "o"],
            "plan": ["opt-125m"], "check": ["x"]}.get(command, [])


@pytest.mark.parametrize("command", COMMANDS)
def test_exit_statuses_are_the_same_with_or_without_v_for_every_command(command, monkeypatch, capsys):
    def raising(error):
        def handler(args):
            raise error
        return handler

    cases = [(ValueError("bad input"), 2), (qopt.QoptError("bad file"), 2), (FileNotFoundError(2, "gone", "f"), 2),
             (RuntimeError("boom"), 3), (KeyError("k"), 3), (KeyboardInterrupt(), 130)]
    for error, status in cases:
        monkeypatch.setattr(_module(command), "run", raising(error))
        assert main([command, *_minimal(command)]) == status, (command, error)
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        if status == 3:
            assert "internal error" in err and "run with -v" in err
        if status != 130:
            assert main(["-v", command, *_minimal(command)]) == status  # -v adds the traceback, nothing else
            assert main([command, *_minimal(command), "-v"]) == status
            assert "Traceback" in capsys.readouterr().err
    for code in (0, 1):
        monkeypatch.setattr(_module(command), "run", lambda args, code=code: code)
        assert main([command, *_minimal(command)]) == code
    with pytest.raises(SystemExit) as usage:  # argparse's usage error
        main([command, *_minimal(command), "--no-such-flag"])
    assert usage.value.code == 2


def test_real_failures_keep_their_status_under_v(tmp_path):
    result = run_cli("-v", "generate", "/nonexistent", "hi")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("qopt generate: error: /nonexistent")
    verdict = tmp_path / "verdict.json"
    result = run_cli("eval", "-v", "--check", str(tmp_path / "missing.json"), "--json", str(verdict))
    assert result.returncode == 2 and json.loads(verdict.read_text())["exit_code"] == 2
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_cli("check", str(tmp_path / "model"), "-v").returncode == 1  # a failed rule
    assert run_cli("-v", "plan", "opt-66b", "--gpu", "1GiB", "--cpu", "1GiB").returncode in (0, 1)


def test_help_and_readme_state_the_exit_statuses():
    text = build_parser().format_help()
    for line in ("0    success", "1    a regression", "2    a usage or input error", "3    an internal error",
                 "130  interrupted"):
        assert line in text, line
    readme = README.read_text()
    assert "Exit statuses are a contract" in readme and "3 an internal error" in " ".join(readme.split())


def test_version_names_the_libraries_a_bug_report_needs():
    out = run_cli("--version").stdout
    for name in ("qopt 0.1.0", "torch ", "bitsandbytes ", "accelerate ", "huggingface_hub "):
        assert name in out, out


# -- parsing --------------------------------------------------------------------------------------------------
def test_options_anywhere_after_the_command_including_between_model_and_prompt(capsys):
    parser = build_parser()
    args = parser.parse_args(["generate", "DIR", "--bits", "4", "hi", "--max-new-tokens", "3"])
    assert args.words == ["DIR", "hi"] and args.bits == 4 and args.max_new_tokens == 3
    args = parser.parse_args(["merge", "BASE", "--bits", "4", "ADAPTER", "-o", "out"])
    assert (args.base, args.adapter, args.bits) == ("BASE", "ADAPTER", 4)
    assert main(["generate", BUNDLED, "--bits", "16", "The", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_a_device_given_twice_to_max_memory_is_refused(capsys):
    assert main(["generate", "Hi", "--device-map", "auto", "--max-memory", "cpu=1GiB", "cpu=2GiB"]) == 2
    assert "device cpu is given twice" in capsys.readouterr().err


def test_help_texts_read_right():
    text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    flat = " ".join(text.split())
    assert "(default: True)" not in flat and "default: keep them in the cache" in flat


def test_every_command_creates_missing_output_folders_and_says_so(tmp_path, capsys):
    report = tmp_path / "a" / "b" / "report.json"
    assert main(["eval", "--windows", "1", "--bits", "16", "--json", str(report)]) == 0
    assert report.is_file() and f"created folder {report.parent}" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    out = tmp_path / "c" / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), "-o", str(out), "--max-new-tokens", "1"]) == 0
    assert out.is_file() and f"created folder {out.parent}" in capsys.readouterr().err
    quantized = tmp_path / "d" / "nf4"
    assert main(["quantize", "-o", str(quantized)]) == 0
    assert (quantized / "config.json").is_file() and "created folder" in capsys.readouterr().err


def test_a_foreign_architecture_is_named(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    result = run_cli("generate", str(folder), "hi")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not an OPT model (model_type gpt2)" in result.stderr


# -- arguments checked before the load ------------------------------------------------------------------------
@pytest.mark.parametrize("flags,fragment", [(["--max-new-tokens", "-1"], "--max-new-tokens -1"),
                                            (["--num-beams", "0"], "--num-beams 0"),
                                            (["--top-p", "2"], "--top-p 2.0"),
                                            (["--max-new-tokens", "900"], "positions")])
def test_bad_arguments_fail_before_the_load_and_before_the_prompt_is_echoed(flags, fragment, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(qopt, "load", no_load)
    assert main(["generate", BUNDLED, "Once upon a time", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and fragment in captured.err and len(captured.err.strip().splitlines()) == 1


def test_a_load_ends_with_one_summary_line_off_a_terminal():
    result = run_cli("generate", "Hi", "--max-new-tokens", "1")
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"qopt generate: loaded .+ in [\d.]+ s \(.+ of weights: .+cpu\)", lines[0])


def test_on_a_terminal_the_first_line_comes_before_the_heavy_imports_then_a_bar():
    import pty
    import select

    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "qopt", "generate", "Hi", "--max-new-tokens", "1"],
                               stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    seen, first = b"", None
    while process.poll() is None or select.select([leader], [], [], 0)[0]:
        if select.select([leader], [], [], 0.05)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            seen += chunk
            if first is None and b"\n" in seen:
                first = time.perf_counter() - began
    os.close(leader)
    text = seen.decode(errors="replace")
    assert process.wait() == 0, text
    assert text.startswith("qopt generate: loading ") and first is not None and first < 1.0, (first, text)
    assert "Loading" in text and "loaded" in text  # the shard bar, then the summary


# -- flags, never Python keywords ----------------------------------------------------------------------------
def _public_keywords():
    names = set()
    for fn in (qopt.load, qopt.load_adapter, qopt.generate_text, qopt.generate_many, qopt.finetune,
               qopt.TrainingArguments, qopt.LoraConfig, qopt.merge_adapter, qopt.compare_precisions,
               qopt.evaluate_perplexity, qopt.quantize_checkpoint, qopt.calibrate_checkpoint, qopt.plan,
               qopt.plan_finetune, qopt.resolve_model, qopt.GenerationConfig):
        names |= set(inspect.signature(fn).parameters) - {"self", "args", "kwargs", "config_overrides"}
    return names


def assert_flag_words(stderr: str) -> None:
    """No line a user reads names a library argument in its Python form (`offload_folder=`, `overwrite=True`)."""
    pattern = re.compile(rf"(?<![\w./-])({'|'.join(sorted(_public_keywords(), key=len, reverse=True))})=")
    for line in stderr.splitlines():
        assert not pattern.search(line), line


def test_cli_messages_name_flags_not_python_keywords(tmp_path, capsys):
    small = tmp_path / "small"
    qopt.load(BUNDLED, progress=False).save_pretrained(small)
    model = qopt.load(BUNDLED, quantization="nf4", progress=False)
    layer = qopt.weight_footprint(model.model.decoder.layers[0]).bytes
    cpu = qopt.plan(BUNDLED, 4, {"cpu": 1 << 40}, context=64).used_bytes("cpu") - 2 * layer  # what it needs
    cases = [["generate", "Hi", "--bits", "4", "--device-map", "auto", "--max-memory", f"cpu={cpu}",
              "--context", "64"],  # offload
             ["quantize", str(small), "-o", str(small)],
             ["quantize", "-o", str(small)],  # an existing model without --force
             ["generate", "Hi", "--revision", "v1"],
             ["generate", "Hi", "--top-k", "-1"], ["generate", "Hi", "--temperature", "0"],
             ["generate", "Hi", "--stream-from-host"], ["eval", "--windows", "0"], ["eval", "--seqlen", "9999"],
             ["merge", BUNDLED, str(tmp_path / "none"), "-o", str(tmp_path / "m")],
             ["finetune", "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "ft")]]
    for case in cases:
        status = main(case)
        err = capsys.readouterr().err
        assert status == 2, (case, err)
        assert_flag_words(err)
    assert "--offload-folder" in main_err(cases[0], capsys) and "--force" in main_err(cases[2], capsys)


def main_err(case, capsys):
    main(case)
    return capsys.readouterr().err
