"""Every optimizer shows its hyperparameters: in its signature, with their defaults written once,
and in its docstring's ``Args:`` block; an unknown keyword fails naming the class."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from slimopt.optimizers import (ROOT, SARA, SNSM, AdaPreLoRA, GaLore, GrassJump, GrassWalk,
                                SubsetNorm, SubspaceMomentum)
from slimopt.optimizers.core.hyperparameters import OPTIMIZER_WIDE, init_arguments, undocumented

pytestmark = pytest.mark.filterwarnings("ignore:.*they get dense AdamW")

CLASSES = [GrassWalk, GrassJump, SARA, GaLore, SNSM, SubspaceMomentum, SubsetNorm, ROOT,
           AdaPreLoRA]
#: signature defaults the constructor resolves before they become group defaults
RESOLVED = {(AdaPreLoRA, "lora_scale"): (None, 1.0)}
#: a valid value other than the default, for options a generic rule cannot make one for
OTHER = {"walk_tangent_rank": "full", "moment_rule": "reset", "residual": "scaled",
         "walk_init": "random", "coefficients": "muon", "lr_scale": "original",
         "ns_dtype": "float32", "subset_size": 4, "lora_scale": 2.0, "momentum_on": "steps"}


def _make(cls, **kwargs):
    if cls is AdaPreLoRA:  # a LoRA pair group: A (r x n), B (m x r)
        return cls([{"params": [nn.Parameter(torch.ones(2, 6)), nn.Parameter(torch.ones(4, 2))]}],
                   **kwargs)
    return cls([nn.Parameter(torch.ones(4, 6))], **kwargs)


def _other_value(name, default):
    if name in OTHER and OTHER[name] != default:
        return OTHER[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default * (1.1 if default >= 1 else 0.9)
    if isinstance(default, int):
        return default + 1
    return None


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_no_hidden_keywords(cls):
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert all(p.default is not p.empty for p in init_arguments(cls))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_defaults_are_the_group_defaults(cls):
    signature = {p.name: p.default for p in init_arguments(cls)}
    options = {k: v for k, v in signature.items()
               if inspect.signature(cls).parameters[k].kind is inspect.Parameter.KEYWORD_ONLY
               and k not in OPTIMIZER_WIDE}
    assert cls.option_defaults == options
    opt = _make(cls)
    expected = {k: RESOLVED.get((cls, k), (v, v))[1] for k, v in signature.items()
                if k not in OPTIMIZER_WIDE}
    assert opt.defaults == {**expected, "dense": False}
    group = opt.param_groups[0]
    assert {k: group[k] for k in expected} == expected
    assert opt.nonfinite == signature["nonfinite"] and opt.seed == signature.get("seed", 0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_explicit_arguments_reach_the_groups(cls):
    """Each option passed by keyword lands in the group (none dropped on the way)."""
    for name, default in cls.option_defaults.items():
        value = _other_value(name, default)
        if value is None:
            continue  # statistics: a single choice
        opt = _make(cls, **{name: value})
        assert opt.param_groups[0][name] == value != default, name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_docstring_has_an_args_block(cls):
    doc = inspect.getdoc(cls)
    assert "\nArgs:\n" in doc
    assert undocumented(cls) == []
    args = doc.split("\nArgs:\n", 1)[1]
    for p in init_arguments(cls):
        assert f"    {p.name} (default: {p.default!r}): " in args, p.name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_keyword_names_the_class(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.__init__\(\) got an unexpected "
                                        r"keyword argument 'rnak'"):
        _make(cls, rnak=4)


def test_subclass_defaults_differ_where_the_method_does():
    assert GrassJump.option_defaults["moment_rule"] == "transport"
    assert GaLore.option_defaults["moment_rule"] == "keep"
    assert SubspaceMomentum.option_defaults["subset_norm"] is False
    assert SNSM.option_defaults["subset_norm"] is True


def test_a_recipe_without_its_own_signature_is_told_to_write_one():
    from slimopt.optimizers.bases import TopSVD
    from slimopt.optimizers.core import SubspaceAdam

    class Foo(SubspaceAdam):
        policy_from_group = staticmethod(lambda group: TopSVD())

    with pytest.raises(TypeError, match="Foo declares no hyperparameters"):
        Foo([nn.Parameter(torch.ones(3, 3))], 1e-3)
