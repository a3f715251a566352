"""Each basis policy's defining property."""
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from reference import geodesic_distance
from slimopt.optimizers.bases import GrassmannWalk, ImportanceSVD, RandomJump, TopSVD
from slimopt.optimizers.bases.base import orthonormalize
from slimopt.optimizers.core.rng import Draws, mix_seed

POLICIES = [TopSVD(), ImportanceSVD(), RandomJump(), GrassmannWalk(0.3),
            GrassmannWalk(1.2, "full", "random")]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_bases_orthonormal(policy, dtype, tol):
    d, k, r = 24, 40, 6
    grad = torch.randn(d, k, dtype=dtype)
    basis = policy.initial(grad, r, Draws(0, 0, 0))
    for j in range(1, 30):  # many moves: walks must not drift from orthonormality
        assert basis.shape == (d, r)
        torch.testing.assert_close(basis.T @ basis, torch.eye(r, dtype=dtype), atol=tol, rtol=0)
        basis = policy.next(basis, torch.randn(d, k, dtype=dtype), r,
                            Draws(0, 0, j))


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
        s = RandomJump().next(None, grad, r, Draws(7, 1, j))
        acc += s @ s.T
    mean = acc / draws
    # the entries of S S^T have standard deviation below 0.5; 4000 draws -> error ~ 0.01
    assert (mean - (r / d) * torch.eye(d, dtype=torch.float64)).abs().max() < 0.04


def test_grassjump_bases_have_the_haar_second_moments():
    """Beyond the mean: for a uniform (Haar) rank-r projection P = S S^T in R^d,
    E[P_ii^2] = r (r + 2) / (d (d + 2)) and E[P_ij^2] = r (d - r) / (d (d - 1) (d + 2)) (i != j).
    Random coordinate subspaces have the same mean r/d but E[P_ii^2] = r/d: 0.375 against 0.1875
    here, which this test rejects."""
    d, r, draws = 8, 3, 4000
    grad = torch.zeros(d, 20, dtype=torch.float64)
    diag = off = 0.0
    for j in range(draws):
        s = RandomJump().next(None, grad, r, Draws(5, 9, j))
        p2 = (s @ s.T) ** 2
        diag += float(p2.diagonal().mean())
        off += float((p2.sum() - p2.diagonal().sum()) / (d * (d - 1)))
    assert diag / draws == pytest.approx(r * (r + 2) / (d * (d + 2)), abs=0.01)
    assert off / draws == pytest.approx(r * (d - r) / (d * (d - 1) * (d + 2)), abs=0.004)


def _lowbias32(x):
    """The same integer hash as slimopt's, in plain Python integers (an independent check that
    the tensor code computes it without overflow, hence the same bits on every device)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_draws_are_plain_integer_hashes():
    draws = Draws(3, 1, 4)
    key = mix_seed(draws.seed, 0)
    got = draws.uniform(300, "cpu")
    bits = [_lowbias32(_lowbias32(i ^ (key & 0xFFFFFFFF)) ^ (key >> 32 & 0xFFFFFFFF))
            for i in range(300)]
    assert got.tolist() == [(b + 0.5) / 2 ** 32 for b in bits]
    assert not torch.equal(draws.uniform(300, "cpu"), got)  # the next call is a new stream


def test_draws_do_not_depend_on_the_dtype():
    a = Draws(1, 2, 3).normal(64, 8, torch.empty(0, dtype=torch.float64))
    b = Draws(1, 2, 3).normal(64, 8, torch.empty(0, dtype=torch.float32))
    assert torch.equal(a.float(), b)
    z = Draws(0, 0, 0).normal(400, 500, torch.empty(0, dtype=torch.float64)).flatten()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1.0) < 0.01
    assert float((z.abs() < 1).double().mean()) == pytest.approx(0.6827, abs=0.004)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_are_the_same_on_cuda():
    cpu = Draws(1, 2, 3).normal(256, 16, torch.empty(0, dtype=torch.float64))
    gpu = Draws(1, 2, 3).normal(256, 16, torch.empty(0, dtype=torch.float64, device="cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-14, atol=1e-14)


def test_sara_drawn_columns_in_index_order():
    """The drawn singular directions come in descending singular value (index) order."""
    d, k = 7, 11
    sigma = torch.linspace(7.0, 1.0, d, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, d, dtype=torch.float64))
    grad = u @ torch.diag(sigma) @ v.T
    orders = set()
    for j in range(200):
        s = ImportanceSVD().next(None, grad, 4, Draws(2, 0, j))
        idx = [int(i) for i in (u.T @ s).abs().argmax(dim=0)]
        assert idx == sorted(idx) and len(set(idx)) == 4
        orders.add(tuple(idx))
    assert len(orders) > 10  # really random


def test_grassjump_basis_is_a_function_of_the_draw():
    grad = torch.randn(10, 15)
    a = RandomJump().next(None, grad, 4, Draws(3, 5, 2))
    b = RandomJump().next(None, grad, 4, Draws(3, 5, 2))
    c = RandomJump().next(None, grad, 4, Draws(3, 5, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({mix_seed(3, 5, j) for j in range(1000)}) == 1000


@pytest.mark.parametrize("tangent_rank", [1, "full"])
@pytest.mark.parametrize("angle", [0.05, 0.5, math.pi / 2])
def test_grasswalk_moves_exactly_the_step_angle(angle, tangent_rank):
    d, r = 30, 5
    policy = GrassmannWalk(angle, tangent_rank, "random")
    grad = torch.zeros(d, 40, dtype=torch.float64)
    basis = policy.initial(grad, r, Draws(0, 0, 0))
    for j in range(1, 6):
        new = policy.next(basis, grad, r, Draws(0, 0, j))
        assert geodesic_distance(basis, new) == pytest.approx(angle, rel=1e-6, abs=1e-6)
        basis = new


def test_grasswalk_rank_one_turns_one_direction():
    d, r = 20, 4
    policy = GrassmannWalk(0.4, 1, "random")
    grad = torch.zeros(d, 25, dtype=torch.float64)
    basis = policy.initial(grad, r, Draws(1, 0, 0))
    new = policy.next(basis, grad, r, Draws(1, 0, 1))
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
        s = ImportanceSVD().next(None, grad, 2, Draws(11, 0, j))
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
    s = ImportanceSVD().next(None, grad, 3, Draws(0, 0, 0))
    torch.testing.assert_close(s.T @ s, torch.eye(3, dtype=torch.float64))
    assert (u[:, 0] @ s).abs().max() == pytest.approx(1.0)


def test_grassjump_regenerates_the_same_basis_in_another_dtype():
    """A checkpoint resumed in another dtype (or on another device type) must regenerate the
    basis its moments are expressed in: the draw does not depend on either."""
    import slimopt
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 30, generator=g, dtype=torch.float64)
    grad = torch.randn(12, 30, generator=g, dtype=torch.float64)
    bases = []
    for dtype in (torch.float64, torch.float32):
        p = torch.nn.Parameter(w.to(dtype))
        opt = slimopt.GrassJump([("layer.weight", p)], rank=3, update_interval=2)
        for _ in range(3):
            p.grad = grad.to(dtype)
            opt.step()
        bases.append(opt.current_basis(p).double())
    torch.testing.assert_close(bases[1], bases[0], rtol=0, atol=1e-6)


def test_draws_pinned_uniforms():
    """The uniforms are exact integer hashes: the same bits on every machine and torch build."""
    draws = Draws(1, 2, 3)
    assert [x.hex() for x in draws.uniform(4, "cpu").tolist()] == [
        "0x1.5f56274a00000p-2", "0x1.5913db6d00000p-1", "0x1.85aea68900000p-1",
        "0x1.42b94e4f00000p-1"]
    assert [x.hex() for x in draws.uniform(2, "cpu").tolist()] == [
        "0x1.480c0fa300000p-1", "0x1.6ff69c8a00000p-2"]


def test_draws_past_a_16_bit_counter():
    draws = Draws(2, 7, 1)
    key = mix_seed(draws.seed, 0)
    got = draws.uniform(140_000, "cpu")
    for i in (0, 255, 256, 65535, 65536, 65537, 131071, 131072, 139_999):
        b = _lowbias32(_lowbias32(i ^ (key & 0xFFFFFFFF)) ^ (key >> 32 & 0xFFFFFFFF))
        assert got[i].item() == (b + 0.5) / 2 ** 32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 2), (3, 5), (40, 30)])
def test_draws_normal_is_box_muller_of_the_uniforms(rows, cols, dtype):
    """Bit for bit the plain Box-Muller of ``uniform``: first half radii, second half angles,
    (radius cos, radius sin) pairs in order, computed in float64 and cast at the end."""
    count = rows * cols
    pairs = (count + 1) // 2
    u = Draws(4, 0, 4).uniform(2 * pairs, "cpu")
    radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
    angle = (2.0 * math.pi) * u[pairs:]
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
    expected = z.reshape(-1)[:count].reshape(rows, cols).to(dtype)
    assert torch.equal(Draws(4, 0, 4).normal(rows, cols, torch.empty(0, dtype=dtype)), expected)
