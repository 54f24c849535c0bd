"""The package's shape: imports flow one way along the pipeline, so it cannot silently decay.

Every module's imports are read with `ast`, function-level ones included (a lazy import is still a dependency),
and each qopt-internal import is checked against the declared layers below, a DAG: the core is a chain (files,
network, formats, placement, the loader); the features (generation, fine-tuning, calibration) stand side by side
on the core, none importing another; evaluation measures and judges them, the CLI composes everything. A module
may import from its own package and the layers under it, never from a later stage or a sibling feature. The only
exception is the network's Hugging Face facade (`from_pretrained`, `save_pretrained`, `generate`), which reaches
up to the loader, the saver and the decoder lazily, in one marked place.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qopt

# Bottom to top, as data flows through a load; the README's Layout table and docs/design.md describe each.
# Packages in one tuple share a rank; SIBLINGS share it without seeing each other.
LAYERS = (
    ("errors", "utils", "bundled"),
    ("io",),
    ("model",),
    ("quant",),
    ("place",),
    ("loading",),
    ("generation", "finetuning", "calibration"),
    ("evaluation",),
    ("cli",),
    ("__init__", "__main__"),
)
SIBLINGS = frozenset({"generation", "finetuning", "calibration"})
FACADE = {("qopt.model.network", "qopt.loading.loader"), ("qopt.model.network", "qopt.loading.saving"),
          ("qopt.model.network", "qopt.generation.decoding")}


def layer_of(module: str, layers=LAYERS) -> int:
    """Layer index of a dotted module name inside the package ("qopt.place.plan" -> the "place" layer)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(layers):
        if top in names:
            return index
    raise AssertionError(f"{module}: not in any declared layer; add its package to LAYERS")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every package-internal import in the file, at any depth of the code."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == root.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == root.name:
                target = node.module
            else:
                continue
            # `from . import x` names a submodule when x is one
            for alias in node.names if not node.module or node.level else [None]:
                sub = f"{target}.{alias.name}" if alias is not None else target
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (root.parent / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_module else target))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(root: Path, layers=LAYERS, allowed=frozenset(), siblings=SIBLINGS) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        if "data" in path.relative_to(root).parts[:1]:
            continue
        name = module_name(path, root)
        if name == root.name:  # the package __init__ re-exports every stage (lazily)
            continue
        own = layer_of(name, layers)
        for line, target in imported_modules(path, root):
            if target == root.name or (name, target) in allowed:
                continue
            if layer_of(target, layers) > own:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {target}, a later stage")
            elif package_of(name) in siblings and package_of(target) in siblings and \
                    package_of(name) != package_of(target):
                problems.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {target}, a sibling "
                                f"feature (features stand on the core alone)")
    return problems


def test_qopt_imports_flow_one_way_along_the_pipeline():
    root = Path(qopt.__file__).parent
    assert layering_violations(root, allowed=FACADE) == []


def test_the_checker_catches_an_upward_import(tmp_path):
    """A synthetic package where the network imports the loader outside the facade: the checker must fail."""
    root = tmp_path / "pkg"
    for folder in ("model", "loading"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "model" / "network.py").write_text(textwrap.dedent("""\
        import torch

        def helper():
            from ..loading.loader import load  # lazy, but still upward
            return load
        """))
    (root / "loading" / "loader.py").write_text("from ..model.network import helper\nfrom ..model import network\n")
    layers = (("model",), ("loading",), ("__init__",))
    problems = layering_violations(root, layers)
    assert len(problems) == 1 and "pkg.model.network imports pkg.loading.loader" in problems[0]
    # the same import declared as the facade passes, and a downward import never fails
    assert layering_violations(root, layers, allowed={("pkg.model.network", "pkg.loading.loader")}) == []


def test_the_checker_catches_an_edge_between_sibling_features(tmp_path):
    root = tmp_path / "pkg"
    for folder in ("model", "generation", "finetuning"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "model" / "network.py").write_text("X = 1\n")
    (root / "generation" / "decoding.py").write_text("from ..model.network import X\n")
    (root / "finetuning" / "trainer.py").write_text("from ..model import network\nfrom ..generation import decoding\n")
    layers = (("model",), ("generation", "finetuning"), ("__init__",))
    problems = layering_violations(root, layers, siblings=frozenset({"generation", "finetuning"}))
    assert len(problems) == 1 and "pkg.finetuning.trainer imports pkg.generation.decoding, a sibling" in problems[0]


def test_importing_the_network_does_not_import_bitsandbytes_or_later_stages():
    code = ("import sys, qopt.model.network, qopt.model.tokenizer; "
            "print(sorted(m for m in sys.modules if m.startswith(('bitsandbytes', 'qopt', 'accelerate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert not [m for m in loaded if m.startswith(("bitsandbytes", "accelerate"))], loaded
    assert all(m.split(".")[1] in ("model", "errors", "utils", "bundled", "io") for m in loaded if "." in m), loaded


def test_import_qopt_is_lazy_and_leaves_the_root_logger_alone():
    code = ("import logging, sys; before = list(logging.getLogger().filters); import qopt; "
            "assert logging.getLogger().filters == before; assert 'bitsandbytes' not in sys.modules; "
            "assert 'torch' not in sys.modules; print(qopt.OPTConfig.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qopt.model.config"


@pytest.mark.parametrize("name", sorted(qopt.__all__))
def test_every_public_name_resolves(name):
    assert getattr(qopt, name) is not None
