"""Every qopt name the text tells a reader to use exists, so a rename cannot leave a stale pointer behind.

Read: comments, docstrings and messages (every string literal) in the package, the examples and the
benchmarks, and README.md and docs/*.md. A dotted name in backticks whose first part is `qopt`, a qopt
subpackage or module (`place.device_map.infer_device_map`, `lora.add_lora`) or a qopt class, function
or public name (`QuantizationConfig.bits_for`) must resolve (import the longest module prefix, getattr the
rest); a qopt function under a module that does not exist (`planning.infer_device_map`) is stale. In Python
text a bare `qopt.x.y` (a message such as "call qopt.add_lora first") is checked as well.
"""
import ast
import importlib
import importlib.util
import io
import re
import tokenize
from pathlib import Path

import pytest

import qopt

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qopt"
SOURCES = [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "examples").glob("*.py")),
           *sorted((ROOT / "evals").glob("*.py"))]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

BACKTICKED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")
BARE_QOPT = re.compile(r"(?<![\w./-])qopt(?:\.[A-Za-z_]\w*)+")
# a file name, not a Python name (`config.json`, `gate.json`)
FILE_SUFFIXES = {"json", "txt", "raw", "tokens", "bpe", "md", "py", "safetensors", "so", "bin", "log", "toml"}
# an instance's attribute, named after the variable that holds it (`model` is also a subpackage)
VARIABLES = {"model.lora_adapters", "model.hf_device_map", "model.fused_loss", "config.dtype", "report.quality"}
# the usual import aliases of other packages (`bnb.nn.Linear4bit` is bitsandbytes', not qopt's)
ALIASES = {"bnb", "nn", "np", "F"}


def qopt_modules() -> dict[str, list[str]]:
    """First part of a dotted name -> the qopt modules it may start at ("plan" -> place.plan, finetuning.plan)."""
    starts: dict[str, list[str]] = {"qopt": ["qopt"]}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        for first in range(1, len(parts)):
            starts.setdefault(parts[first], []).append(".".join(parts[:first + 1]))
    return starts


def qopt_definitions() -> dict[str, list[str]]:
    """Top-level function, class and constant names of the package -> the modules that define them."""
    defined: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(module)
    return defined


STARTS = qopt_modules()
DEFINED = qopt_definitions()


def resolves(name: str) -> bool:
    """True when `name` (absolute, "qopt...") is a module, or an attribute chain inside the longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                value = getattr(value, attribute)
        except AttributeError:
            return False
        return True
    return False


def candidates(name: str) -> list[str] | None:
    """The absolute names `name` may mean, or None when it is not a qopt name at all."""
    first, _, rest = name.partition(".")
    if name.rsplit(".", 1)[-1] in FILE_SUFFIXES or name in VARIABLES:
        return None
    if first in STARTS:
        return [f"{module}.{rest}" for module in STARTS[first]]
    if first in DEFINED:  # `QuantizationConfig.bits_for`, `OffloadStore.layer_keys`
        return [f"{module}.{name}" for module in DEFINED[first]]
    if first in qopt.__all__:
        return [f"qopt.{name}"]
    if name.rsplit(".", 1)[-1] in DEFINED and first not in ALIASES \
            and importlib.util.find_spec(first) is None:
        return []  # a qopt function under a module that does not exist (`planning.infer_device_map`)
    return None


def text_pieces(path: Path) -> list[tuple[int, str, bool]]:
    """(line, text, is_python) for every comment and string literal of a Python file, or the whole of a doc."""
    if path.suffix != ".py":
        return [(1, path.read_text(encoding="utf-8"), False)]
    pieces = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if token.type in (tokenize.COMMENT, tokenize.STRING):
            pieces.append((token.start[0], token.string, True))
    return pieces


def named_in(path: Path) -> list[tuple[int, str]]:
    found = []
    for line, text, is_python in text_pieces(path):
        matches = [(m.start(), m.group(1)) for m in BACKTICKED.finditer(text)]
        if is_python:
            matches += [(m.start(), m.group(0)) for m in BARE_QOPT.finditer(text)]
        found += sorted({(line + text.count("\n", 0, start), name) for start, name in matches})
    return found


def stale_names(paths: list[Path]) -> list[str]:
    stale = []
    for path in paths:
        for line, name in named_in(path):
            options = candidates(name)
            if options is not None and not any(resolves(option) for option in options):
                stale.append(f"{path.relative_to(ROOT)}:{line}: `{name}` does not resolve")
    return stale


@pytest.mark.parametrize("paths", [SOURCES, DOCS], ids=["python", "docs"])
def test_every_qopt_name_in_the_text_resolves(paths):
    assert not stale_names(paths), "\n".join(stale_names(paths))


def test_the_check_catches_a_stale_name(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text('"""Use `planning.infer_device_map` or `qopt.place.device_map.infer_device_map`."""\n'
                     'raise ValueError("no adapter (call qopt.lora.add_lora first)")  # `lora.add_lora`\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(__import__(__name__), "ROOT", tmp_path)
        found = stale_names([stale])
    assert found == ["stale.py:1: `planning.infer_device_map` does not resolve",
                     "stale.py:2: `qopt.lora.add_lora` does not resolve"]
    assert resolves("qopt.place.device_map.infer_device_map") and resolves("qopt.add_lora")
