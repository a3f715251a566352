"""torch.optim conventions: parameter keys independent of how the model is split, tensor lr,
maximize, unknown group keys refused (galore-torch's names read), describe(), foreign states."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import slimopt
from optimizer_registry import OPTIMIZERS, info_id
from slimopt.optimizers import GaLore, GrassJump, GrassWalk, SARA
from slimopt.optimizers.core.keys import name_key

pytestmark = [pytest.mark.filterwarnings("ignore:.*they get dense AdamW"),
              pytest.mark.filterwarnings("ignore:.*have no names")]
PER_PARAMETER = [info for info in OPTIMIZERS if not info.lora_pairs]


def _matrix(seed, shape=(48, 48)):
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def _bases(opt, params, steps=1):
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + t))
        opt.step()
    return [opt.current_basis(p).clone() for p in params]


# ---------------------------------------------------------------- keys
@pytest.mark.parametrize("cls,kw", [(GrassJump, {}), (GrassWalk, dict(walk_init="random")),
                                    (SARA, {})], ids=["GrassJump", "GrassWalk-random", "SARA"])
def test_two_instances_draw_different_bases(cls, kw):
    a, b = _matrix(0), _matrix(1)
    opt_a, opt_b = cls([a], rank=4, **kw), cls([b], rank=4, **kw)
    assert opt_a.param_key(a) != opt_b.param_key(b)
    (basis_a,), (basis_b,) = _bases(opt_a, [a]), _bases(opt_b, [b])  # the same gradient
    assert not torch.equal(basis_a, basis_b)


def test_named_keys_do_not_depend_on_the_split():
    a, b = _matrix(0), _matrix(1)
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    whole = GrassJump([("layer.0.w", a), ("layer.1.w", b)], rank=4, update_interval=2)
    split_a = GrassJump([("layer.0.w", a2)], rank=4, update_interval=2)
    split_b = GrassJump([{"params": [b2], "param_names": ["layer.1.w"]}], rank=4,
                        update_interval=2)
    assert whole.param_key(a) == split_a.param_key(a2) == name_key("layer.0.w")
    bases = _bases(whole, [a, b], steps=3)
    assert torch.equal(bases[0], _bases(split_a, [a2], steps=3)[0])
    assert torch.equal(bases[1], _bases(split_b, [b2], steps=3)[0])
    assert not torch.equal(bases[0], bases[1])
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_name_key_is_stable_and_63_bit():
    assert name_key("model.layers.0.mlp.up_proj.weight") == \
        int.from_bytes(__import__("hashlib").sha256(b"model.layers.0.mlp.up_proj.weight")
                       .digest()[:8], "big") % (1 << 63)
    assert 0 <= name_key("x") < 1 << 63


def test_unnamed_random_rule_warns_once_with_advice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = GrassJump([_matrix(0)], rank=4)
        opt.add_param_group({"params": [_matrix(1)]})
        GrassJump([("w", _matrix(2))], rank=4)
        GaLore([_matrix(3)], rank=4)  # top-r SVD: no random draws
    ours = [w for w in caught if "no names" in str(w.message)]
    assert len(ours) == 1 and "named_parameters()" in str(ours[0].message)
    assert "slimopt.param_groups(model)" in str(ours[0].message)


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="names must be unique"):
        GrassJump([{"params": [_matrix(0), _matrix(1)], "param_names": ["w", "w"]}], rank=4)


def test_old_position_keys_survive_a_load():
    """A checkpoint keyed by position (older slimopt) continues with its own keys."""
    a = _matrix(0)
    opt = GrassJump([("w", a)], rank=4, update_interval=2)
    _bases(opt, [a])
    saved = opt.state_dict()
    saved["state"][0]["key"] = 0
    saved["param_groups"][0].pop("maximize")  # saved before maximize existed
    b = nn.Parameter(a.detach().clone())
    fresh = GrassJump([("w", b)], rank=4, update_interval=2)
    fresh.load_state_dict(saved)
    assert fresh.state[b]["key"] == 0 and fresh.param_groups[0]["maximize"] is False


# ---------------------------------------------------------------- tensor lr
def test_tensor_lr_steps_as_the_float_and_round_trips():
    torch.manual_seed(0)
    a = _matrix(0, (12, 8))
    b = nn.Parameter(a.detach().clone())
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt_t = GrassWalk([("w", a)], lr=lr, rank=2, update_interval=2)
    opt_f = GrassWalk([("w", b)], lr=float(lr), rank=2, update_interval=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_t, lambda t: 0.5 ** t)
    sched_f = torch.optim.lr_scheduler.LambdaLR(opt_f, lambda t: 0.5 ** t)
    for t in range(3):
        for p in (a, b):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
        opt_t.step(), opt_f.step(), sched.step(), sched_f.step()
    assert torch.is_tensor(opt_t.param_groups[0]["lr"])
    assert torch.equal(a, b)
    again = GrassWalk([("w", nn.Parameter(a.detach().clone()))], lr=torch.tensor(1.0), rank=2,
                      update_interval=2)
    again.load_state_dict(opt_t.state_dict())
    assert float(again.param_groups[0]["lr"]) == float(opt_t.param_groups[0]["lr"])


@pytest.mark.parametrize("bad", [torch.tensor([1e-3]), torch.tensor(-1e-3), torch.tensor(1),
                                 torch.tensor(float("nan"))], ids=["1d", "neg", "int", "nan"])
def test_bad_tensor_lr_is_refused(bad):
    with pytest.raises(ValueError, match="lr must be"):
        GaLore([_matrix(0)], lr=bad, rank=4)


# ---------------------------------------------------------------- maximize
def _run(info, maximize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 14), nn.Tanh(), nn.Linear(14, 6))
    opt = info.cls(model.named_parameters(), maximize=maximize, **info.kwargs)
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 6, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        (-loss if maximize else loss).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("info", PER_PARAMETER, ids=info_id)
def test_maximize_of_minus_f_is_minimize_of_f(info):
    for a, b in zip(_run(info, True), _run(info, False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable", "differentiable"])
def test_torch_flags_are_refused_naming_them(flag):
    with pytest.raises(TypeError, match=flag):
        GrassWalk([_matrix(0)], rank=4, **{flag: False})
    with pytest.raises(ValueError, match=flag):
        GrassWalk([{"params": [_matrix(0)], flag: False}], rank=4)


# ---------------------------------------------------------------- group keys
def test_unknown_group_key_is_refused_listing_the_options():
    opt = GrassWalk([_matrix(0)], rank=4)
    with pytest.raises(ValueError, match=r"unknown parameter group option\(s\) \['rnak'\].*"
                                         "update_interval"):
        opt.add_param_group({"params": [_matrix(1)], "rnak": 4})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="update_proj_gap"):
        slimopt.SubsetNorm([{"params": [_matrix(1)], "update_proj_gap": 4}])


def test_scheduler_keys_are_accepted():
    opt = GrassWalk([{"params": [_matrix(0)], "initial_lr": 1e-3}], rank=4, lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    opt.load_state_dict(opt.state_dict())  # max_lr, min_lr, max_momentum, base_momentum


def test_galore_keys():
    opt = GaLore([{"params": [_matrix(0)], "rank": 4, "update_proj_gap": 7, "scale": 0.5,
                   "proj_type": "std"}])
    group = opt.param_groups[0]
    assert group["update_interval"] == 7 and "update_proj_gap" not in group
    assert "proj_type" not in group
    with pytest.raises(ValueError, match="alias"):
        GaLore([{"params": [_matrix(0)], "update_proj_gap": 7, "update_interval": 8}])
    GaLore([{"params": [_matrix(0)], "update_proj_gap": 7, "update_interval": 7}])
    for proj in ("reverse_std", "left", "right", "full"):
        with pytest.raises(ValueError, match="square matrices on the left"):
            SARA([{"params": [_matrix(0)], "proj_type": proj}])


def test_unknown_key_in_a_saved_group_is_refused():
    opt = GaLore([_matrix(0)], rank=4)
    saved = opt.state_dict()
    saved["param_groups"][0]["foreach"] = None
    with pytest.raises(ValueError, match="group 0 of the state: unknown"):
        opt.load_state_dict(saved)


# ---------------------------------------------------------------- describe
def test_describe_lists_every_parameter_and_is_logged_once(caplog):
    model = nn.Sequential(nn.Linear(8, 14), nn.Linear(14, 6))
    opt = GrassWalk([{"params": [model[0].weight, model[0].bias], "param_names": ["0.w", "0.b"]},
                     {"params": [model[1].weight, model[1].bias], "rank": None,
                      "param_names": ["1.w", "1.b"]}], rank=4)
    table = opt.describe().splitlines()
    assert table[0].split() == ["name", "shape", "dtype", "rule", "rank", "group"]
    assert len(table) == 2 + 4
    assert table[2].split()[:3] == ["0.w", "14x8", "float32"] and "GrassWalk" in table[2]
    assert table[2].split()[-2:] == ["4", "0"]
    assert "AdamW (dense)" in table[3] and table[5].split()[-2:] == ["-", "1"]
    assert GaLore([_matrix(0)], rank=4).describe().splitlines()[2].startswith("-")
    with caplog.at_level(logging.INFO, logger="slimopt"):
        for _ in range(2):
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
    logged = [r for r in caplog.records if r.name == "slimopt" and "0.w" in r.getMessage()]
    assert len(logged) == 1


# ---------------------------------------------------------------- foreign states
def test_torch_adamw_state_is_refused_naming_what_is_missing():
    model = nn.Linear(8, 14)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    adamw.step()
    opt = GrassWalk(model.parameters(), rank=4)
    with pytest.raises(ValueError, match="lacks the options.*rank.*another optimizer"):
        opt.load_state_dict(adamw.state_dict())


def test_another_slimopt_class_is_refused_naming_it():
    a = _matrix(0)
    saved = GaLore([a], rank=4).state_dict()
    with pytest.raises(ValueError, match="saved by GaLore"):
        GrassWalk([a], rank=4).load_state_dict(saved)
