"""The code stays readable: ``slimopt-pretrain``'s ``train`` is a short loop over named parts, and
no function anywhere in the package grows past 60 lines (measured with ``ast``)."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slimopt")
MODULES = sorted(os.path.relpath(os.path.join(folder, name), PACKAGE)
                 for folder, _, names in os.walk(PACKAGE) for name in names
                 if name.endswith(".py"))


def _functions(relpath):
    with open(os.path.join(PACKAGE, relpath), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("relpath", MODULES)
def test_no_function_over_60_lines(relpath):
    long = {f: n for f, n in _functions(relpath).items() if n > 60}
    assert not long, f"{relpath}: {long}"


def test_the_training_loop_fits_on_a_screen():
    assert _functions(os.path.join("launch", "pretrain.py"))["train"] <= 40
