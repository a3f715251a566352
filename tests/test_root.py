"""ROOT: equality with torch's Muon when its robustness is off, a float64 reference of the full
update, and the outlier split's defining properties."""
import math

import pytest
import torch

from slimopt.kernels import MUON_COEFFICIENTS
from slimopt.optimizers import ROOT
from slimopt.optimizers.root import outlier_threshold, suppress_outliers


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_muon_without_robustness(shape, nesterov):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours = torch.nn.Parameter(w0.clone())
    theirs = torch.nn.Parameter(w0.clone())
    opt = ROOT([ours], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
               percentile=None, coefficients="muon")
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(5):
        g = torch.randn(shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_original_lr_scale_equals_muon_original():
    torch.manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(30, 12))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = ROOT([ours], lr=0.02, weight_decay=0.0, percentile=None, coefficients="muon",
               lr_scale="original")
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(30, 12)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def reference_root(w0, grads, *, lr, wd, mu, q, coeffs):
    """The paper's form in float64: M <- mu M + G, U = G + mu M, B = U - T_eps(U), quintic NS."""
    w, m = w0.clone(), torch.zeros_like(w0)
    rows, cols = w0.shape
    for g in grads:
        m = mu * m + g
        u = g + mu * m
        flat = u.abs().flatten().sort().values
        eps = flat[math.ceil(q * flat.numel()) - 1]
        outliers = torch.sign(u) * (u.abs() - eps).clamp(min=0)   # soft threshold T_eps
        x = u - outliers
        x = x.T if rows > cols else x
        x = x / (x.norm() + 1e-30)
        for a, b, c in coeffs:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if rows > cols else x
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(rows, cols)) * x
    return w


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = ROOT([p], lr=0.01, weight_decay=0.1, ns_dtype="float64", ns_eps=1e-30)
    coeffs = opt.step_coefficients(shape, opt.param_groups[0])
    assert len(coeffs) == 5
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    expected = reference_root(w0, grads, lr=0.01, wd=0.1, mu=0.95, q=0.9, coeffs=coeffs)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)


def test_outlier_split_properties():
    torch.manual_seed(4)
    u = torch.randn(50, 70, dtype=torch.float64)
    b = suppress_outliers(u, 0.9)
    eps = outlier_threshold(u, 0.9)
    outliers = u - b
    assert (b.abs() <= eps).all()
    torch.testing.assert_close(outliers, torch.sign(u) * (u.abs() - eps).clamp(min=0))
    assert float((u.abs() <= eps).double().mean()) == pytest.approx(0.9, abs=1e-3)
    assert torch.equal(suppress_outliers(u, None), u)


def test_planted_outlier_moves_root_far_less_than_muon():
    torch.manual_seed(5)
    g = torch.randn(32, 64)
    spiked = g.clone()
    spiked[3, 7] = 1e3

    def update(cls_kwargs, grad):
        p = torch.nn.Parameter(torch.zeros(32, 64))
        opt = ROOT([p], lr=1.0, weight_decay=0.0, ns_dtype="float32", **cls_kwargs)
        p.grad = grad.clone()
        opt.step()
        return -p.detach()

    root_change = (update({}, spiked) - update({}, g)).norm()
    muon_kw = dict(percentile=None, coefficients="muon")
    muon_change = (update(muon_kw, spiked) - update(muon_kw, g)).norm()
    assert root_change < 0.1 * muon_change


def test_adaptive_coefficients_follow_the_shape():
    opt = ROOT([torch.nn.Parameter(torch.zeros(4, 4))])
    group = opt.param_groups[0]
    assert opt.step_coefficients((30, 12), group) == opt.step_coefficients((12, 30), group)
    assert opt.step_coefficients((7, 9), dict(group, coefficients="muon")) == \
        [MUON_COEFFICIENTS] * 5
    explicit = [(3.0, -3.0, 1.0)] * 2
    assert opt.step_coefficients((7, 9), dict(group, coefficients=explicit)) == explicit


@pytest.mark.parametrize("bad,needle", [
    (dict(momentum=1.0), "momentum"), (dict(percentile=0.0), "percentile"),
    (dict(percentile=1.5), "percentile"), (dict(ns_steps=0), "ns_steps"),
    (dict(coefficients="polar"), "coefficients"), (dict(coefficients=[(1.0, 2.0)]), "coefficients"),
    (dict(lr_scale="rms"), "lr_scale"), (dict(nesterov="yes"), "nesterov"),
])
def test_bad_input(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ROOT([torch.nn.Parameter(torch.zeros(3, 3))], **bad)
