"""The README's examples run as written: every Python block and every `qopt` line, on the bundled model; the same
for docs/usage.md, the README's long form.

Placeholders a reader replaces with their own model (`path/to/...`, `MODEL`, a hub id) become the bundled
model's folder; long runs are shortened (fewer windows and steps) without changing what each line exercises.
Each block runs in a fresh process in a temporary folder, so files the examples write land there.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qopt.bundled import bundled_model_dir, wikitext2_test_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = (README, ROOT / "docs" / "usage.md")
BUNDLED = str(bundled_model_dir())
SHORTER = [(r"max_steps=\d+", "max_steps=2"), (r"max_windows=\d+", "max_windows=2"),
           (r"--windows \d+", "--windows 2")]


def blocks(language: str) -> list[str]:
    return [block for doc in DOCUMENTS for block in re.findall(rf"```{language}\n(.*?)```", doc.read_text(), re.S)]


def make_adapter(folder: Path, workdir: Path) -> None:
    """The adapter the README's `qopt finetune` line writes, for the lines and blocks that use it."""
    if not folder.exists():
        subprocess.run([sys.executable, "-m", "qopt", "finetune", "--data", "train.txt", "--output", str(folder),
                        "--bits", "4", "--steps", "1"], cwd=workdir, check=True, capture_output=True)


def substitute(text: str) -> str:
    text = re.sub(r"path/to/[\w.\-]+", BUNDLED, text)
    text = re.sub(r"\bfacebook/opt-[\w.]+", BUNDLED, text)
    for pattern, short in SHORTER:
        text = re.sub(pattern, short, text)
    return text


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "train.txt").write_text(wikitext2_test_path().read_text(encoding="utf-8")[:20_000])
    return tmp_path


def test_the_readme_has_examples_to_run():
    assert len(blocks("python")) >= 6 and len(cli_lines()) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index, workdir):
    code = substitute(blocks("python")[index])
    if '"my-adapter"' in code:
        make_adapter(workdir / "my-adapter", workdir)
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README python block {index}:\n{code}\n{result.stderr[-3000:]}"


def cli_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("qopt "):
                lines.append(line)
    return lines


def command(line: str, workdir: Path) -> list[str]:
    words = shlex.split(line)
    args = [BUNDLED if w == "MODEL" else str(workdir / w.replace("MODEL", "model")) if w.startswith("MODEL-")
            else w for w in words[1:]]
    if args[0] == "eval" and "--check" not in args and "--windows" not in args:
        args += ["--windows", "2"]
    if args[0] == "finetune":
        args += ["--steps", "2"]
    if args[0] == "generate" and "--adapter" in args:  # the adapter the README's finetune line writes
        make_adapter(workdir / args[args.index("--adapter") + 1], workdir)
    if args[0] == "merge":  # an adapter as the README's finetune line writes
        make_adapter(workdir / args[2], workdir)
    return [sys.executable, "-m", "qopt", *args]


@pytest.mark.slow
@pytest.mark.parametrize("line", cli_lines())
def test_cli_line_runs_as_written(line, workdir):
    if "--check" in line:  # the gate re-runs its fixed baseline: `make gate` runs this very line in CI
        from qopt.cli.main import build_parser

        build_parser().parse_args(shlex.split(line)[1:])
        return
    for folder in ("evals/results", "evals/baselines"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    args = command(substitute(line), workdir)
    result = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{line}\n{' '.join(args)}\n{result.stderr[-3000:]}"
    from test_cli_contract import assert_flag_words

    assert_flag_words(result.stderr)  # flags, never the library's keyword arguments
