"""Run the `qopt` command with one fault injected:

    python tests/gate_fault.py MODULE ATTRIBUTE EXPRESSION ARGS...

ATTRIBUTE may be dotted (`Linear4bit.remember_statistics`); EXPRESSION is Python evaluated with `original` bound
to the value it replaces and `qopt` imported. MODULE `-` runs the command unmodified. A fresh process per fault,
because the tokenized evaluation text and the quantizer tables are cached per process (tests/test_gate_mutations.py).
"""
from __future__ import annotations

import functools
import importlib
import sys


def inject(module_name: str, attribute: str, expression: str) -> None:
    *parents, name = attribute.split(".")
    owner = functools.reduce(getattr, parents, importlib.import_module(module_name))
    original = getattr(owner, name)
    setattr(owner, name, eval(expression, {"original": original, "qopt": importlib.import_module("qopt")}))


def main(argv: list[str]) -> int:
    module_name, attribute, expression, *args = argv
    if module_name != "-":
        inject(module_name, attribute, expression)
    from qopt.cli import main as qopt_main

    return qopt_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
