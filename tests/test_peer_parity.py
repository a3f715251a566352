"""slimopt against the peers' own code, in float64: ``GaLore`` against galore-torch's
``GaLoreAdamW`` and ``GaLore(recovery=True, residual="scaled")`` against fira's ``FiraAdamW``.

The peers compute their SVD in float32; here their projector's ``get_orthogonal_matrix`` is
replaced by a float64 one (the same singular vectors, signs as slimopt's SVD of the matrix the
basis spans), so that everything else in their step -- the moments, the bias correction folded
into the step size, Fira's scaling factor, its limiter and its residual -- is compared to
float64 rounding. eps is 1e-30, next to nothing: the peers add it to the uncorrected sqrt(v), slimopt (as torch's
AdamW) to the corrected one; weight decay is 0 (the peers decay after the update, torch before).
"""
import pytest
import torch

import slimopt

fira = pytest.importorskip("fira")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
galore_torch = pytest.importorskip("galore_torch")

SHAPES = [(12, 40), (40, 12), (24, 24)]
STEPS, GAP, RANK, SCALE = 60, 10, 4, 0.25


def _float64_basis(self, weights, rank, type):
    """The peer projector's basis, in float64: ``type="left"``: the top ``rank`` left singular
    vectors (m x r); ``"right"``: the top right singular vectors as rows (r x n). Signs: each
    vector's entry of largest magnitude positive, slimopt's convention (a sign flip between two
    refreshes changes what kept moments mean, in both libraries alike)."""
    if type == "left":
        return _top_left(weights.double(), rank)
    if type == "right":
        return _top_left(weights.double().T, rank).T
    raise AssertionError(f"unexpected projector type {type}")


def _top_left(matrix, rank):
    u = torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]
    peak = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    return u * torch.sign(peak)


def _problem(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    A = torch.randn(2 * m, m, generator=g, dtype=torch.float64)
    B = torch.randn(2 * m, n, generator=g, dtype=torch.float64)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W0, lambda W: A.T @ (A @ W - B) / A.shape[0]


def _train(opt, p, grad_fn):
    for _ in range(STEPS):
        p.grad = grad_fn(p.detach())
        opt.step()
    return p.detach()


def _relative_gap(ours, theirs, W0):
    return float((ours - theirs).norm() / (theirs - W0).norm())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_recovery_matches_fira(monkeypatch, shape):
    from fira.gradient_projection import GradientProjector
    monkeypatch.setattr(GradientProjector, "get_orthogonal_matrix", _float64_basis)
    W0, grad_fn = _problem(shape, seed=sum(shape))
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.0)
    q = torch.nn.Parameter(W0.clone())
    theirs = _train(fira.FiraAdamW([{"params": [q], "rank": RANK, "update_proj_gap": GAP,
                                     "alpha": SCALE, "proj_type": "std"}], **hyper), q, grad_fn)
    bound = _count_limiter_binding(monkeypatch)
    p = torch.nn.Parameter(W0.clone())
    opt = slimopt.GaLore([p], rank=RANK, update_interval=GAP, scale=SCALE, recovery=True,
                         residual="scaled", **hyper)
    ours = _train(opt, p, grad_fn)
    assert _relative_gap(ours, theirs, W0) < 1e-9
    assert len(bound) >= 10  # the limiter's order matters only where it binds


def _count_limiter_binding(monkeypatch):
    """A list that collects one entry per step at which slimopt's limiter bound."""
    from slimopt.optimizers.core import subspace_adam_batch as subspace_adam
    original, bound = subspace_adam.recovery_scales, []

    def counting(grads, projected, directions, previous, **kwargs):
        phi, norms = original(grads, projected, directions, previous, **kwargs)
        cap = kwargs["limiter"] * (previous + 1e-8)
        bound.extend(norms[norms == cap].tolist())
        return phi, norms
    monkeypatch.setattr(subspace_adam, "recovery_scales", counting)
    return bound


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_galore_matches_galore_torch(monkeypatch, shape):
    from galore_torch.galore_projector import GaLoreProjector
    monkeypatch.setattr(GaLoreProjector, "get_orthogonal_matrix", _float64_basis)
    W0, grad_fn = _problem(shape, seed=2 * sum(shape))
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.0)
    q = torch.nn.Parameter(W0.clone())
    theirs = _train(galore_torch.GaLoreAdamW([{"params": [q], "rank": RANK, "update_proj_gap": GAP,
                                               "scale": SCALE, "proj_type": "std"}], **hyper),
                    q, grad_fn)
    p = torch.nn.Parameter(W0.clone())
    ours = _train(slimopt.GaLore([p], rank=RANK, update_interval=GAP, scale=SCALE, **hyper),
                  p, grad_fn)
    assert _relative_gap(ours, theirs, W0) < 1e-9
