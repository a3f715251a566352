"""The training harness stays readable: ``train`` is a short loop over named parts and no function
of the harness or of slimopt-launch grows past 60 lines (measured with ``ast``)."""
import ast
import os

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slimopt",
                      "launch")
HARNESS = ("pretrain.py", "train_config.py", "deepspeed_config.py", "run_setup.py",
           "checkpointer.py", "train_step.py", "run_logger.py", "launcher.py")


def _functions(name):
    with open(os.path.join(LAUNCH, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("name", HARNESS)
def test_no_function_over_60_lines(name):
    long = {f: n for f, n in _functions(name).items() if n > 60}
    assert not long, f"{name}: {long}"


def test_the_training_loop_fits_on_a_screen():
    assert _functions("pretrain.py")["train"] <= 40
