"""Each basis policy's defining property."""
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from reference import geodesic_distance
from slimopt.optimizers.bases import GrassmannWalk, ImportanceSVD, RandomJump, TopSVD
from slimopt.optimizers.bases.base import orthonormalize
from slimopt.optimizers.core.rng import generator_for, mix_seed

POLICIES = [TopSVD(), ImportanceSVD(), RandomJump(), GrassmannWalk(0.3),
            GrassmannWalk(1.2, "full", "random")]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_bases_orthonormal(policy, dtype, tol):
    d, k, r = 24, 40, 6
    grad = torch.randn(d, k, dtype=dtype)
    basis = policy.initial(grad, r, generator_for(grad.device, 0, 0, 0))
    for j in range(1, 30):  # many moves: walks must not drift from orthonormality
        assert basis.shape == (d, r)
        torch.testing.assert_close(basis.T @ basis, torch.eye(r, dtype=dtype), atol=tol, rtol=0)
        basis = policy.next(basis, torch.randn(d, k, dtype=dtype), r,
                            generator_for(grad.device, 0, 0, j))


def test_orthonormalize_keeps_an_orthonormal_input_and_fixes_signs():
    q, _ = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64))
    q = q * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(orthonormalize(q), q, rtol=0, atol=1e-14)
    mat = torch.randn(9, 4, dtype=torch.float64)
    r = orthonormalize(mat).T @ mat  # the R factor: upper triangular, positive diagonal
    torch.testing.assert_close(r, torch.triu(r), rtol=0, atol=1e-12)
    assert (torch.diagonal(r) > 0).all()


def test_top_svd_spans_leading_singular_vectors():
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 8, dtype=torch.float64))
    grad = u @ torch.diag(torch.arange(8, 0, -1).double()) @ v.T
    basis = TopSVD().next(None, grad, 3, None)
    torch.testing.assert_close((basis.T @ u[:, :3]).abs(), torch.eye(3, dtype=torch.float64))


def test_grassjump_bases_uniform_on_grassmannian():
    """E[S S^T] = (r/d) I for the uniform distribution; 4000 draws."""
    d, r, draws = 8, 3, 4000
    grad = torch.zeros(d, 20, dtype=torch.float64)
    acc = torch.zeros(d, d, dtype=torch.float64)
    for j in range(draws):
        s = RandomJump().next(None, grad, r, generator_for(grad.device, 7, 1, j))
        acc += s @ s.T
    mean = acc / draws
    # the entries of S S^T have standard deviation below 0.5; 4000 draws -> error ~ 0.01
    assert (mean - (r / d) * torch.eye(d, dtype=torch.float64)).abs().max() < 0.04


def test_grassjump_basis_is_a_function_of_the_draw():
    grad = torch.randn(10, 15)
    a = RandomJump().next(None, grad, 4, generator_for(grad.device, 3, 5, 2))
    b = RandomJump().next(None, grad, 4, generator_for(grad.device, 3, 5, 2))
    c = RandomJump().next(None, grad, 4, generator_for(grad.device, 3, 5, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({mix_seed(3, 5, j) for j in range(1000)}) == 1000


@pytest.mark.parametrize("tangent_rank", [1, "full"])
@pytest.mark.parametrize("angle", [0.05, 0.5, math.pi / 2])
def test_grasswalk_moves_exactly_the_step_angle(angle, tangent_rank):
    d, r = 30, 5
    policy = GrassmannWalk(angle, tangent_rank, "random")
    grad = torch.zeros(d, 40, dtype=torch.float64)
    basis = policy.initial(grad, r, generator_for(grad.device, 0, 0, 0))
    for j in range(1, 6):
        new = policy.next(basis, grad, r, generator_for(grad.device, 0, 0, j))
        assert geodesic_distance(basis, new) == pytest.approx(angle, rel=1e-6, abs=1e-6)
        basis = new


def test_grasswalk_rank_one_turns_one_direction():
    d, r = 20, 4
    policy = GrassmannWalk(0.4, 1, "random")
    grad = torch.zeros(d, 25, dtype=torch.float64)
    basis = policy.initial(grad, r, generator_for(grad.device, 1, 0, 0))
    new = policy.next(basis, grad, r, generator_for(grad.device, 1, 0, 1))
    angles = torch.arccos(torch.linalg.svdvals(basis.T @ new).clamp(max=1.0))
    assert int((angles > 1e-6).sum()) == 1


def _successive_pair_probabilities(w):
    total = sum(w)
    probs = {}
    for i, j in itertools.combinations(range(len(w)), 2):
        probs[(i, j)] = w[i] / total * w[j] / (total - w[i]) + w[j] / total * w[i] / (total - w[j])
    return probs


def _draw_sara_pairs(draws):
    d, k = 6, 10
    sigma = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, d, dtype=torch.float64))
    grad = u @ torch.diag(sigma) @ v.T
    counts = {}
    for j in range(draws):
        s = ImportanceSVD().next(None, grad, 2, generator_for(grad.device, 11, 0, j))
        idx = tuple(sorted(int(i) for i in (u.T @ s).abs().argmax(dim=0)))
        counts[idx] = counts.get(idx, 0) + 1
    return sigma.tolist(), counts


def test_sara_selection_frequencies_match_successive_sampling():
    """Chi-square of the drawn index pairs against the exact successive-sampling probabilities
    with weights sigma_i; and the test has power: weights sigma_i^2 are rejected."""
    draws = 6000
    sigma, counts = _draw_sara_pairs(draws)
    pairs = list(itertools.combinations(range(len(sigma)), 2))
    observed = [counts.get(pair, 0) for pair in pairs]
    assert sum(observed) == draws
    expected = _successive_pair_probabilities(sigma)
    assert chisquare(observed, [draws * expected[p] for p in pairs]).pvalue > 1e-3
    squared = _successive_pair_probabilities([s * s for s in sigma])
    assert chisquare(observed, [draws * squared[p] for p in pairs]).pvalue < 1e-6


def test_sara_with_fewer_nonzero_directions_than_rank():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    grad = torch.outer(u[:, 0], torch.randn(9, dtype=torch.float64))  # rank one
    s = ImportanceSVD().next(None, grad, 3, generator_for(grad.device, 0, 0, 0))
    torch.testing.assert_close(s.T @ s, torch.eye(3, dtype=torch.float64))
    assert (u[:, 0] @ s).abs().max() == pytest.approx(1.0)
