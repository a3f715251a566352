"""Randomized SVD of a gradient (bases/randomized_svd.py) against the exact top-r subspace."""
import pytest
import torch

from slimopt.optimizers.bases.randomized_svd import (exact_top_left_singular_vectors, fix_signs,
                                                      top_left_singular_vectors)
from slimopt.optimizers.core.rng import Draws


def haar(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def with_spectrum(d, k, sigma, seed=0):
    """``U diag(sigma) V^T`` with Haar ``U`` (d x d), ``V`` (k x d); returns the matrix and U."""
    u, v = haar(d, d, seed), haar(k, d, seed + 1)
    return (u * sigma) @ v.T, u


def sin_max_angle(a, b):
    """The sine of the largest principal angle between the column spaces of orthonormal a, b."""
    return float(torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2))


def assert_orthonormal(q, tol):
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    assert torch.allclose(q.T @ q, eye, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_orthonormal_columns_shape_and_dtype(dtype, tol):
    g = torch.randn(60, 150, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = top_left_singular_vectors(g, 8, Draws(1, 2))
    assert q.shape == (60, 8) and q.dtype == dtype and q.is_contiguous()
    assert_orthonormal(q, tol)


def test_gapped_spectrum_recovers_the_exact_subspace():
    d, k, r = 80, 200, 10
    sigma = torch.cat([10.0 ** -torch.linspace(0, 1, r), 1e-4 * 0.9 ** torch.arange(d - r)])
    g, u = with_spectrum(d, k, sigma.double())
    q = top_left_singular_vectors(g, r, Draws(3), oversample=5, power_iterations=2)
    assert sin_max_angle(u[:, :r], q) < 1e-10
    assert sin_max_angle(exact_top_left_singular_vectors(g, r), q) < 1e-10


def test_signs_match_the_exact_vectors_on_a_gap():
    sigma = torch.cat([torch.tensor([8.0, 4.0, 2.0, 1.0]), 1e-6 * torch.ones(36)]).double()
    g, _ = with_spectrum(40, 90, sigma)
    q = top_left_singular_vectors(g, 4, Draws(5), oversample=4, power_iterations=2)
    assert torch.allclose(q, exact_top_left_singular_vectors(g, 4), atol=1e-9)
    big = q.abs().argmax(dim=0)
    assert (q[big, torch.arange(4)] > 0).all()


def test_flat_spectrum_still_gives_an_orthonormal_basis():
    g, _ = with_spectrum(50, 70, torch.ones(50, dtype=torch.float64))
    q = top_left_singular_vectors(g, 6, Draws(7))
    assert q.shape == (50, 6)
    assert_orthonormal(q, 1e-12)


def test_same_parts_same_basis_other_parts_other_basis():
    g = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    a = top_left_singular_vectors(g, 8, Draws(1, 2, 3), oversample=2, power_iterations=0)
    b = top_left_singular_vectors(g, 8, Draws(1, 2, 3), oversample=2, power_iterations=0)
    c = top_left_singular_vectors(g, 8, Draws(1, 2, 4), oversample=2, power_iterations=0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_global_rng_is_not_consumed():
    g = torch.randn(32, 64)
    state = torch.get_rng_state()
    top_left_singular_vectors(g, 4, Draws(0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, k, rank, oversample",
                         [(48, 48, 8, None), (48, 48, 40, 10), (30, 100, 25, 10), (30, 100, 30, 0)])
def test_square_and_oversized_sketch(dtype, d, k, rank, oversample):
    g = torch.randn(d, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    q = top_left_singular_vectors(g, rank, Draws(9), oversample=oversample)
    assert q.shape == (d, rank) and q.dtype == dtype
    assert_orthonormal(q, 1e-5 if dtype == torch.float32 else 1e-12)
    if rank + (oversample or 10) >= d:  # the sketch covers everything: exact
        assert torch.allclose(q, exact_top_left_singular_vectors(g, rank))


def test_tall_input_and_low_precision():
    g = torch.randn(120, 40, generator=torch.Generator().manual_seed(3))
    q = top_left_singular_vectors(g, 5, Draws(4))
    assert q.shape == (120, 5)
    assert_orthonormal(q, 1e-5)
    assert top_left_singular_vectors(g.bfloat16(), 5, Draws(4)).dtype == torch.bfloat16


def test_fix_signs_and_bad_arguments():
    q = fix_signs(torch.tensor([[0.1, -0.9], [-0.8, 0.2]]))
    assert torch.equal(q, torch.tensor([[-0.1, 0.9], [0.8, -0.2]]))
    g = torch.randn(10, 20)
    with pytest.raises(ValueError):
        top_left_singular_vectors(g, 11, Draws(0))
    with pytest.raises(ValueError):
        top_left_singular_vectors(g, 2, Draws(0), power_iterations=-1)
