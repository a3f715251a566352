"""SN-SM, Subspace-Momentum and Subset-Norm against float64 references written from the paper's
equations (arXiv 2411.07120), and the reductions to AdaGrad / AdaGrad-Norm / momentum SGD."""
import math

import pytest
import torch

from slimopt.optimizers import SNSM, SubsetNorm, SubspaceMomentum
from slimopt.optimizers.core.subspace_momentum import subspace_momentum_direction_


def _problem(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2 * m, m, generator=g, dtype=torch.float64)
    B = torch.randn(2 * m, n, generator=g, dtype=torch.float64)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W0, lambda W: A.T @ (A @ W - B) / A.shape[0]


def reference_snsm(W0, grad_fn, bases, steps, *, lr, betas, eps, weight_decay, interval,
                   subset_norm=True):
    """theta <- theta(1 - lr wd) - lr c_t (P m + g - P P^T g) / (sqrt(v) + eps), written with the
    matrix as it is: P on the smaller side, v one number per index of the larger side."""
    b1, b2 = betas
    W = W0.clone()
    m_, n_ = W.shape
    left = m_ <= n_
    mom = None
    v = torch.zeros(max(m_, n_), dtype=torch.float64)
    for t in range(steps):
        G = grad_fn(W)
        P = bases[t]
        if t % interval == 0:
            mom = torch.zeros(P.shape[1], max(m_, n_), dtype=torch.float64)  # reset
        if left:
            proj = P.T @ G
            mom = b1 * mom + (1 - b1) * proj
            direction = P @ mom + (G - P @ proj)
            sq = (G ** 2).sum(dim=0)          # one subset per column (the larger side)
        else:
            proj = G @ P                      # m x r
            mom = b1 * mom + (1 - b1) * proj.T
            direction = mom.T @ P.T + (G - proj @ P.T)
            sq = (G ** 2).sum(dim=1)          # one subset per row (the larger side)
        step = t + 1
        if subset_norm:
            v = v + sq if b2 == 1.0 else b2 * v + (1 - b2) * sq
            c = (math.sqrt(1 - b2 ** step) if b2 < 1 else 1.0) / (1 - b1 ** step)
            denom = v.sqrt() + eps
            direction = c * (direction / denom if left else direction / denom[:, None])
        W = W * (1 - lr * weight_decay) - lr * direction
    return W


@pytest.mark.parametrize("shape", [(6, 11), (13, 5)], ids=["m<n", "m>n"])
@pytest.mark.parametrize("cls,betas", [(SNSM, (0.8, 0.95)), (SNSM, (0.9, 1.0)),
                                       (SubspaceMomentum, (0.8, 0.95))],
                         ids=["SNSM", "SNSM-adagrad", "SubspaceMomentum"])
def test_matches_float64_reference(cls, betas, shape):
    W0, grad_fn = _problem(*shape, seed=sum(shape))
    hyper = dict(lr=0.03, betas=betas, eps=1e-6, weight_decay=0.1)
    p = torch.nn.Parameter(W0.clone())
    opt = cls([p], rank=3, update_interval=4, **hyper)
    bases = []
    for _ in range(10):
        p.grad = grad_fn(p.detach())
        opt.step()
        bases.append(opt.current_basis(p).clone())
    expected = reference_snsm(W0, grad_fn, bases, 10, interval=4,
                              subset_norm=cls is SNSM, **hyper)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    assert (bases[3] - bases[4]).abs().max() > 1e-6


def test_subspace_momentum_with_full_basis_is_momentum_sgd():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    m_sub = torch.zeros(5, 9, dtype=torch.float64)
    m_full = torch.zeros(5, 9, dtype=torch.float64)
    for _ in range(4):
        grad = torch.randn(5, 9, generator=g, dtype=torch.float64)
        direction = subspace_momentum_direction_(basis, grad, m_sub, 0.9)
        m_full = 0.9 * m_full + 0.1 * grad
        torch.testing.assert_close(direction, m_full, rtol=1e-12, atol=1e-14)


def _run(opt, params, grads):
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()


def test_one_subset_per_coordinate_is_adagrad():
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 7), (9,), (2, 3, 5)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(6)]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    _run(SubsetNorm(ours, lr=0.1, betas=(0.0, 1.0), eps=1e-10, subset_size=1), ours, grads)
    _run(torch.optim.Adagrad(ref, lr=0.1, eps=1e-10), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_one_subset_in_total_is_adagrad_norm():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(x0.clone())
    _run(SubsetNorm([p], lr=0.1, betas=(0.0, 1.0), eps=1e-10, subset_size=60), [p],
         [[gr] for gr in grads])
    x, b2 = x0.clone(), 0.0
    for gr in grads:  # AdaGrad-Norm: one scalar accumulator
        b2 += float((gr ** 2).sum())
        x = x - 0.1 * gr / (math.sqrt(b2) + 1e-10)
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
def test_auto_subsets_of_a_matrix_are_its_larger_side(shape):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(x0.clone())
    opt = SubsetNorm([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    _run(opt, [p], [[gr] for gr in grads])
    assert opt.state[p]["subset_acc"].numel() == max(shape)
    x, m, v = x0.clone(), torch.zeros(shape, dtype=torch.float64), 0.0
    axis = 0 if shape[0] <= shape[1] else 1   # sum over the smaller side
    for t, gr in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * gr
        v = 0.99 * v + 0.01 * (gr ** 2).sum(dim=axis, keepdim=True)
        c = math.sqrt(1 - 0.99 ** t) / (1 - 0.9 ** t)
        x = x - 0.05 * c * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)


def test_generic_tensors_use_sqrt_sized_chunks():
    from slimopt.optimizers.core.subset_norm import chunk_size, default_layout
    assert default_layout((4, 100, 9), "auto") == chunk_size(3600, 30) == 30
    assert default_layout((7,), "auto") == 1
    assert default_layout((6, 10), 7) == 6 and default_layout((6, 10), "auto") == "matrix"
