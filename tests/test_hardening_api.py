"""The optimizer API under misuse: a step either raises before changing anything or completes;
``add_param_group`` and ``load_state_dict`` validate before they change anything; the small gaps
of the reliability review (shared/reviews/reliability.md, defects 2, 9, 10, 11 and 15)."""
import copy
import math

import pytest
import torch
from torch import nn

import slimopt
from optimizer_registry import PER_PARAMETER, assert_unchanged, info_id, snapshot
from slimopt.lora import apply_lora, lora_param_groups
from slimopt.optimizers import ROOT
from slimopt.optimizers.bases.base import orthonormalize
from slimopt.optimizers.core.transport import apply_moment_rule_

by_info = pytest.mark.parametrize("info", PER_PARAMETER, ids=info_id)


# ---------------------------------------------------------------------------- helpers
def _matrix_and_bias(seed=0, m=16, n=32):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(m, n, generator=g)), nn.Parameter(torch.randn(n, generator=g))


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _trained(info, steps=3, params=None, **overrides):
    params = params or list(_matrix_and_bias())
    opt = info.cls(params, **dict(info.kwargs, **overrides))
    for t in range(steps):
        _grads(params, t)
        opt.step()
    return opt, params


def _lora_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)
            self.v_proj = nn.Linear(16, 4)

        def forward(self, x):
            return self.v_proj(torch.relu(self.q_proj(x)))
    return apply_lora(M(), rank=4, alpha=8).to(dtype)


def _lora_step(model, opt, x):
    opt.zero_grad()
    model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().add(1.0).backward()
    opt.step()


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- all-or-nothing steps
@by_info
def test_nonfinite_raise_changes_nothing(info):
    opt, (W, b) = _trained(info, nonfinite="raise")
    before = snapshot(opt)
    _grads([W, b], 10)
    b.grad[3] = float("nan")  # the last parameter of the group: W would be stepped first
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert_unchanged(opt, before)
    b.grad[3] = 0.0
    opt.step()  # usable afterwards
    assert not torch.equal(W.detach(), before["weights"][0])


@by_info
def test_nonfinite_raise_in_a_later_group_changes_nothing(info):
    W, b = _matrix_and_bias()
    V, c = _matrix_and_bias(seed=1)
    opt = info.cls([{"params": [W, b]}, {"params": [V, c]}], **dict(info.kwargs, nonfinite="raise"))
    _grads([W, b, V, c], 0)
    opt.step()
    before = snapshot(opt)
    _grads([W, b, V, c], 1)
    V.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_unchanged(opt, before)


@by_info
def test_sparse_gradient_is_refused_before_any_update(info):
    W, _ = _matrix_and_bias()
    emb = nn.Embedding(10, 4, sparse=True)
    opt, _ = _trained(info, params=[W, emb.weight], steps=0)
    W.grad = torch.randn_like(W)
    emb(torch.tensor([1, 2])).sum().backward()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, before)


@by_info
def test_foreign_tensor_is_refused_before_any_update(info):
    opt, (W, b) = _trained(info)
    stranger = torch.randn(16, 32, requires_grad=True)
    opt.param_groups[0]["params"].append(stranger)  # what deepspeed.initialize does with shards
    _grads([W, b, stranger], 5)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="not one of its parameters"):
        opt.step()
    assert_unchanged(opt, before)


@by_info
@pytest.mark.parametrize("bad_lr", [-0.05, float("nan"), math.inf])
def test_lr_set_by_a_scheduler_is_checked_at_step_time(info, bad_lr):
    W, b = _matrix_and_bias()
    V, c = _matrix_and_bias(seed=1)
    opt = info.cls([{"params": [W, b]}, {"params": [V, c]}], **info.kwargs)
    factors = [1.0, bad_lr / info.kwargs["lr"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: factors[min(t, 1)]])
    _grads([W, b, V, c], 0)
    opt.step()
    sched.step()  # group 1's lr is now bad_lr
    before = snapshot(opt)
    _grads([W, b, V, c], 1)
    with pytest.raises(ValueError, match=r"group 1.*lr") as err:
        opt.step()
    assert repr(opt.param_groups[1]["lr"]) in str(err.value)
    assert_unchanged(opt, before)  # group 0, stepped first, is untouched too


@by_info
def test_method_option_changed_after_construction_is_checked_at_step_time(info):
    opt, (W, b) = _trained(info)
    key, value = next(iter(info.group_bad.items()))
    opt.param_groups[0][key] = value
    before = snapshot(opt)
    _grads([W, b], 7)
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert_unchanged(opt, before)


@by_info
def test_step_on_meta_tensors_is_refused(info):
    with torch.device("meta"):
        W, b = _matrix_and_bias()
    opt = info.cls([W, b], **info.kwargs)
    opt.init_state()  # what meta tensors are for
    W.grad, b.grad = torch.empty_like(W), torch.empty_like(b)
    with pytest.raises(ValueError, match="meta device"):
        opt.step()
    assert [s["step"] for s in opt.state.values()] == [0, 0]  # meta tensors cannot be compared


# ---------------------------------------------------------------------------- add_param_group
@by_info
def test_rejected_param_group_leaves_the_optimizer_as_it_was(info):
    opt, (W, b) = _trained(info)
    V, c = _matrix_and_bias(seed=1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [V, c], "lr": -1.0})
    assert_unchanged(opt, before)
    _grads([W, b, V, c], 4)
    opt.step()  # no misleading error about foreign tensors
    opt.add_param_group({"params": [V, c], "lr": 1e-2})
    V0 = V.detach().clone()
    _grads([W, b, V, c], 5)
    opt.step()
    assert not torch.equal(V.detach(), V0)


@by_info
def test_parameter_listed_twice_is_refused(info):
    W, b = _matrix_and_bias()
    with pytest.raises(ValueError, match="more than once"):
        info.cls([W, b, W], **info.kwargs)
    opt = info.cls([b], **info.kwargs)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [W, W]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------- load_state_dict
def _saved(info, **overrides):
    opt, params = _trained(info, **overrides)
    return opt.state_dict()


def _fresh(info):
    return _trained(info, steps=2)[0]


def _refused(opt, state, needle):
    before = snapshot(opt)
    with pytest.raises(ValueError, match=needle):
        opt.load_state_dict(state)
    assert_unchanged(opt, before)


@by_info
def test_load_refuses_invalid_group_hyperparameters(info):
    state = _saved(info)
    state["param_groups"][0]["lr"] = float("nan")
    _refused(_fresh(info), state, "lr")
    state = _saved(info)
    key, value = next(iter(info.group_bad.items()))
    state["param_groups"][0][key] = value
    _refused(_fresh(info), state, key)


@by_info
def test_load_refuses_state_that_does_not_fit_the_parameters(info):
    wide = _saved(info, params=list(_matrix_and_bias(m=16, n=48)))
    _refused(_fresh(info), wide, "shape")
    W, b = _matrix_and_bias()
    swapped = _saved(info, params=[b, W])
    _refused(_fresh(info), swapped, "shape")


@by_info
def test_load_refuses_missing_state_keys(info):
    state = _saved(info)
    entry = state["state"][0]
    victim = next(k for k in entry if k not in ("step", "nonfinite_skips", "key"))
    del entry[victim]
    _refused(_fresh(info), state, victim)
    state = _saved(info)
    del state["state"][1]["step"]
    _refused(_fresh(info), state, "step")


@by_info
def test_load_refuses_state_for_a_parameter_no_group_lists(info):
    state = _saved(info)
    state["state"][7] = copy.deepcopy(state["state"][1])
    _refused(_fresh(info), state, "7")


@by_info
def test_load_refuses_torch_adamw_state_and_zero_bridge_state(info):
    W, b = _matrix_and_bias()
    adamw = torch.optim.AdamW([W, b])
    _grads([W, b], 0)
    adamw.step()
    _refused(_fresh(info), adamw.state_dict(), "AdamW|options|another optimizer")
    zero = {"slimopt_zero": 1, "world_size": 2, "state": {},
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in _fresh(info).param_groups]}
    _refused(_fresh(info), zero, "ZeRO")
    _refused(_fresh(info), {"state": {}}, "param_groups")


def test_load_refuses_another_method():
    W = nn.Parameter(torch.randn(16, 32))
    src = slimopt.GaLore([W], lr=1e-2, rank=4)
    W.grad = torch.randn(16, 32)
    src.step()
    dst = slimopt.GrassJump([nn.Parameter(torch.randn(16, 32))], lr=1e-2, rank=4)
    _refused(dst, src.state_dict(), "GaLore.*GrassJump")
    assert dst.param_groups[0]["moment_rule"] == "transport"
    assert dst.param_groups[0]["recovery"] is False  # still GrassJump's default
    snsm = slimopt.SNSM([nn.Parameter(torch.randn(16, 32))], lr=1e-2, rank=4)
    _refused(snsm, src.state_dict(), "GaLore")


@by_info
def test_old_checkpoint_without_the_class_marker_still_loads(info):
    opt, (W, b) = _trained(info, steps=4)
    state = copy.deepcopy(opt.state_dict())
    assert state.pop("slimopt_class") == info.name
    W2, b2 = nn.Parameter(W.detach().clone()), nn.Parameter(b.detach().clone())
    resumed = info.cls([W2, b2], **info.kwargs)
    resumed.load_state_dict(state)
    for t in (20, 21):
        _grads([W, b], t)
        _grads([W2, b2], t)
        opt.step()
        resumed.step()
    assert torch.equal(W, W2) and torch.equal(b, b2)


def test_check_state_dict_is_public_and_changes_nothing():
    opt, _ = _trained(PER_PARAMETER[0])
    state = opt.state_dict()
    before = snapshot(opt)
    opt.check_state_dict(state)
    assert_unchanged(opt, before)
    state["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="group 0"):
        opt.check_state_dict(state)


# ---------------------------------------------------------------------------- small gaps
@pytest.mark.parametrize("eps", [0.0, 1e-50])
def test_eps_that_rounds_to_zero_is_refused(eps):
    for cls in (slimopt.GrassWalk, slimopt.SubsetNorm, slimopt.ROOT):
        with pytest.raises(ValueError, match="eps"):
            cls([nn.Parameter(torch.zeros(4, 4))], eps=eps)
    with pytest.raises(ValueError, match="ns_eps"):
        ROOT([nn.Parameter(torch.zeros(4, 4))], ns_eps=eps)


def test_root_steps_a_zero_size_matrix():
    empty = nn.Parameter(torch.zeros(0, 8))
    W = nn.Parameter(torch.randn(6, 8))
    opt = ROOT([empty, W], lr=1e-2)
    W0 = W.detach().clone()
    for t in range(2):
        empty.grad, W.grad = torch.zeros(0, 8), torch.randn(6, 8)
        opt.step()
    assert empty.shape == (0, 8) and not torch.equal(W.detach(), W0) and W.isfinite().all()


@pytest.mark.parametrize("value", [float("nan"), math.inf, True, "3.4"])
def test_root_refuses_non_finite_coefficients(value):
    with pytest.raises(ValueError, match="coefficients"):
        ROOT([nn.Parameter(torch.zeros(4, 4))], coefficients=[(value, -4.775, 2.0315)])


def test_grasswalk_refuses_a_bool_walk_angle():
    with pytest.raises(ValueError, match="walk_angle"):
        slimopt.GrassWalk([nn.Parameter(torch.zeros(8, 8))], rank=2, walk_angle=True)


def test_current_basis_of_a_foreign_tensor_is_a_clear_error():
    opt = slimopt.GaLore([nn.Parameter(torch.zeros(8, 8))], rank=2)
    with pytest.raises(ValueError, match="not one of"):
        opt.current_basis(torch.zeros(8, 8))


@pytest.mark.parametrize("cls", [slimopt.GrassWalk, slimopt.GaLore, slimopt.SNSM,
                                 slimopt.SubsetNorm, slimopt.ROOT])
def test_float16_parameters_with_adam_style_state_are_refused(cls):
    W = nn.Parameter(torch.zeros(8, 8, dtype=torch.float16))
    b = nn.Parameter(torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        cls([W, b], lr=1e-3)


def test_root_takes_float16_matrices():
    W = nn.Parameter(torch.randn(8, 12).half())
    opt = ROOT([W], lr=1e-2)
    W0 = W.detach().clone()
    W.grad = torch.randn(8, 12).half()
    opt.step()
    assert W.isfinite().all() and not torch.equal(W.detach(), W0)


def test_bfloat16_transport_keeps_the_second_moment_positive():
    """Transporting bfloat16 moments right after a huge gradient: V - M o M cancels, and bfloat16
    rounding left V' ~ 0 under a large M' (an Adam step of ~1e24, then NaN; found by the fuzz)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        S0 = orthonormalize(torch.randn(10, 3, generator=g, dtype=torch.float64))
        S1 = orthonormalize(S0 + 0.5 * torch.randn(10, 3, generator=g, dtype=torch.float64))
        R = torch.randn(3, 6, generator=g, dtype=torch.float64) * 1e17
        M, V = 0.1 * R, 0.001 * R * R  # the moments after one Adam step
        apply_moment_rule_("transport", M, V, S0, S1)
        Mb, Vb = (0.1 * R).bfloat16(), (0.001 * R * R).bfloat16()
        apply_moment_rule_("transport", Mb, Vb, S0.bfloat16(), S1.bfloat16())
        ratio = (Mb.double().abs() / Vb.double().sqrt()).max() / (M.abs() / V.sqrt()).max()
        assert ratio < 2.0


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
def test_root_update_of_a_tiny_gradient_is_the_same_as_of_a_normal_one(ns_dtype):
    """Newton-Schulz is scale-invariant, so a gradient scaled by 2^-100 (squares underflow in
    float32) must give the same step; it diverged to NaN with a small ns_eps."""
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    steps = []
    for scale in (1.0, 2.0 ** -100):
        W = nn.Parameter(torch.zeros(12, 20))
        opt = ROOT([W], lr=1e-2, weight_decay=0.0, ns_eps=1e-30, ns_dtype=ns_dtype)
        W.grad = g * scale
        opt.step()
        steps.append(W.detach().clone())
    assert steps[1].isfinite().all() and torch.equal(steps[0], steps[1])


# ---------------------------------------------------------------------------- AdaPreLoRA
def test_adaprelora_zero_first_batch_stays_finite_and_trains():
    """The review's reproduction: a first batch of zero inputs gives an all-zero gradient."""
    model = _lora_model()
    opt = slimopt.AdaPreLoRA(model, lr=1e-3)
    _lora_step(model, opt, torch.zeros(8, 16))
    after_zero = _trainable(model)
    assert all(p.isfinite().all() for p in after_zero.values())
    for t in range(3):
        _lora_step(model, opt, torch.randn(8, 16, generator=torch.Generator().manual_seed(t)))
    now = _trainable(model)
    assert all(p.isfinite().all() for p in now.values()) and opt.nonfinite_skips() == 0
    assert not torch.equal(now["q_proj.lora_A.weight"], after_zero["q_proj.lora_A.weight"])


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-42])
def test_adaprelora_tiny_first_gradient_stays_finite(scale):
    """A first gradient of zeros, 1e-30 or denormal scale (as a LoRA pair's gradients are:
    g_A = s B^T H, g_B = s H A^T), then normal ones: finite, nothing skipped, and moving."""
    model = _lora_model(seed=1)
    opt = slimopt.AdaPreLoRA(model, lr=1e-3)
    start = _trainable(model)
    for t in range(4):
        opt.zero_grad()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(t))
        model(x).pow(2).mean().backward()
        for p in model.parameters():
            if p.grad is not None and t == 0:
                p.grad.mul_(scale)
        opt.step()
        assert all(p.isfinite().all() for p in _trainable(model).values()), t
    assert opt.nonfinite_skips() == 0
    assert not torch.equal(_trainable(model)["q_proj.lora_A.weight"], start["q_proj.lora_A.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaprelora_trains_half_precision_factors(dtype):
    model = _lora_model(seed=2)
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype)
    opt = slimopt.AdaPreLoRA(model, lr=1e-2)
    start = _trainable(model)
    for t in range(4):
        _lora_step(model, opt, torch.randn(8, 16, generator=torch.Generator().manual_seed(t)))
    now = _trainable(model)
    assert all(p.dtype == dtype and p.isfinite().all() for p in now.values())
    assert not torch.equal(now["q_proj.lora_A.weight"], start["q_proj.lora_A.weight"])


def test_adaprelora_gradient_whose_squares_underflow_takes_a_bounded_step():
    """At the first step, statistics of a gradient below ~1e-19 underflow to 0 in float32; p must
    then be 1 (uniform rows), not sqrt(eps1) = 1e-15, which made the factor step ~1e15 times too
    large (unclipped: the weights then overflow; found by the fuzz)."""
    model = _lora_model(seed=6)
    nn.init.normal_(model.q_proj.lora_B.weight)  # so that every term of the step is exercised
    opt = slimopt.AdaPreLoRA(model, lr=1e-2, clip_threshold=None)
    before = _trainable(model)
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(2.0 ** -80)
    opt.step()
    change = max((p - before[n]).abs().max().item() for n, p in _trainable(model).items())
    # q sits at the eps1 floor (|g| / eps1 ~ 1e6), as in Adafactor; it was 2e17 with p = 1e-15
    assert math.isfinite(change) and change < 1e3


def test_adaprelora_undamped_needs_full_rank_factors():
    model = _lora_model(seed=7)  # peft's start: B = 0
    opt = slimopt.AdaPreLoRA(model, lr=1e-2, damping=0.0)
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="damping=0.*rank"):
        opt.step()
    assert_unchanged(opt, before)


def test_adaprelora_pair_with_one_gradient_is_refused_before_any_update():
    model = _lora_model(seed=3)
    opt = slimopt.AdaPreLoRA(model, lr=1e-2)
    _lora_step(model, opt, torch.randn(8, 16))
    before = snapshot(opt)
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    model.v_proj.lora_A.weight.grad = None  # the second pair: the first would have stepped
    with pytest.raises(ValueError, match="only one"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("r,m,n", [(0, 5, 4), (2, 0, 4), (2, 5, 0)])
def test_adaprelora_refuses_a_pair_with_an_empty_side(r, m, n):
    A, B = nn.Parameter(torch.randn(r, n)), nn.Parameter(torch.randn(m, r))
    with pytest.raises(ValueError, match="empty side"):
        slimopt.AdaPreLoRA([{"params": [A, B]}], lr=1e-2)


def test_adaprelora_lora_scale_option_is_honoured_or_refused():
    model = _lora_model(seed=4)
    with pytest.raises(ValueError, match="lora_scale"):
        slimopt.AdaPreLoRA(model, lr=1e-2, lora_scale=3.0)
    groups = lora_param_groups(model)
    with pytest.raises(ValueError, match="lora_scale"):
        slimopt.AdaPreLoRA(groups, lr=1e-2, lora_scale=0.0)
    for g in groups:
        g.pop("lora_scale", None)
    opt = slimopt.AdaPreLoRA(groups, lr=1e-2, lora_scale=3.0)
    assert all(g["lora_scale"] == 3.0 for g in opt.param_groups if not g["dense"])


def test_adaprelora_load_refuses_a_pair_state_of_another_shape():
    src_model, dst_model = _lora_model(seed=5), _lora_model(seed=5)
    src = slimopt.AdaPreLoRA(src_model, lr=1e-2)
    _lora_step(src_model, src, torch.randn(8, 16))
    state = src.state_dict()
    state["state"][0]["row_var"] = torch.zeros(3)
    dst = slimopt.AdaPreLoRA(dst_model, lr=1e-2)
    _refused(dst, state, "row_var")

