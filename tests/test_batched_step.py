"""The fast step of the low-rank methods: batches of same-shape matrices, the one-pass recovery,
no host sync, staggered refreshes, GrassJump's stored basis, randomized SVD and the compiled
step -- each against the plain computation it replaces."""
import math

import pytest
import torch

import slimopt
from slimopt.optimizers.bases import TopSVD
from slimopt.optimizers.core.recovery import recovery_scales
from slimopt.optimizers.core.rng import Draws

SHAPES = [(16, 24), (24, 16), (16, 24), (20, 20), (16, 24), (20, 20)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(opt, params, steps):
    for t in range(steps):
        for p, grad in zip(params, _grads(params, t)):
            p.grad = grad
        opt.step()


@pytest.mark.parametrize("cls,options", [
    (slimopt.GaLore, {}),
    (slimopt.GrassWalk, {}),
    (slimopt.GrassWalk, {"residual": "scaled"}),
    (slimopt.GrassJump, {"recovery": True}),
    (slimopt.SARA, {"recovery": True, "moment_rule": "transport"}),
])
def test_batched_step_equals_one_optimizer_per_matrix(cls, options):
    """Six matrices of three shapes in one optimizer (batches of 3, 2 and 1) step exactly as six
    single-matrix optimizers would, the same keys and so the same draws."""
    hyper = dict(lr=1e-2, rank=4, update_interval=3, weight_decay=0.1, **options)
    together = _params(torch.float64)
    names = [f"w{i}" for i in range(len(SHAPES))]
    _run(cls(list(zip(names, together)), **hyper), together, 8)
    alone = _params(torch.float64)
    opts = [cls([(n, p)], **hyper) for n, p in zip(names, alone)]
    for t in range(8):
        for p, grad in zip(alone, _grads(alone, t)):
            p.grad = grad
        for opt in opts:
            opt.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def _explicit_recovery(grad, basis, projected, direction, previous, *, factor, limiter, correction):
    """Fira's term formed as the papers write it: the residual matrix, scaled, then limited."""
    phi = direction.norm(dim=0) / (projected.norm(dim=0) + 1e-8)
    lam = (grad - factor * basis @ projected) * phi
    norm = float(lam.norm()) / correction
    if previous is not None and norm > limiter * (previous + 1e-8):
        lam = lam * (limiter * (previous + 1e-8) / norm)
        norm = limiter * (previous + 1e-8)
    return lam, norm


@pytest.mark.parametrize("factor", [1.0, 0.25])
@pytest.mark.parametrize("previous", [None, 1e-3, 1e3])
def test_one_pass_recovery_equals_the_residual_formula(factor, previous):
    g = torch.Generator().manual_seed(3)
    d, k, r = 12, 30, 4
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    grad = torch.randn(d, k, generator=g, dtype=torch.float64)
    projected = basis.T @ grad
    direction = torch.randn(r, k, generator=g, dtype=torch.float64)
    lam, norm = _explicit_recovery(grad, basis, projected, direction, previous, factor=factor,
                                   limiter=1.01, correction=0.3)
    prev = torch.tensor([-1.0 if previous is None else previous], dtype=torch.float64)
    phi, norms = recovery_scales([grad], [projected], [direction], prev, factor=factor,
                                 limiter=1.01, correction=0.3)
    # Lambda = G o phi - f S (R o phi): what the batched step adds, without forming the residual
    torch.testing.assert_close(grad * phi[0] - factor * basis @ (projected * phi[0]), lam,
                               rtol=1e-12, atol=1e-14)
    assert math.isclose(float(norms[0]), norm, rel_tol=1e-12)
    if previous == 1e-3:
        assert math.isclose(float(norms[0]), 1.01 * (1e-3 + 1e-8), rel_tol=1e-12)  # it bound


@pytest.mark.parametrize("cls", [slimopt.GaLore, slimopt.GrassWalk, slimopt.GrassJump])
def test_regular_step_reads_nothing_back_to_the_host(monkeypatch, cls):
    """With nonfinite="off" a regular step makes no device-to-host read at all; with the default
    "skip", exactly one (the finiteness of every gradient, together)."""
    params = _params()
    opt = cls([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, rank=4,
              update_interval=100, nonfinite="off")
    skip = cls([(f"w{i}", p) for i, p in enumerate(_params())], lr=1e-2, rank=4,
               update_interval=100)
    _run(opt, params, 2)
    _run(skip, list(skip.param_groups[0]["params"]), 2)
    reads = []

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return original[name](self, *args, **kwargs)
        return read
    original = {name: getattr(torch.Tensor, name)
                for name in ("item", "tolist", "__float__", "__int__", "__bool__")}
    for name in original:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert reads == []
    for p in skip.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    skip.step()
    assert reads == ["tolist"]


def _refresh_steps(opt, params, steps):
    """The 0-based steps at which each matrix's basis changed."""
    changes = {i: [] for i in range(len(params))}
    previous = {}
    for t in range(steps):
        for p, grad in zip(params, _grads(params, t)):
            p.grad = grad
        opt.step()
        for i, p in enumerate(params):
            basis = opt.current_basis(p).clone()
            if i in previous and not torch.equal(previous[i], basis):
                changes[i].append(t)
            previous[i] = basis
    return changes


def test_staggered_refreshes_follow_the_key_offsets_and_spread():
    interval = 6
    params = _params()
    opt = slimopt.GaLore([{"params": params, "param_names": [f"w{i}" for i in range(6)]}],
                         lr=1e-2, rank=4, update_interval=interval, stagger_refresh=True)
    changes = _refresh_steps(opt, params, 3 * interval)
    for i, p in enumerate(params):
        offset = opt.state[p]["key"] % interval
        assert changes[i] == [t for t in range(1, 3 * interval) if (t + offset) % interval == 0]
    plain = slimopt.GaLore([{"params": (q := _params()), "param_names": [f"w{i}" for i in range(6)]}],
                           lr=1e-2, rank=4, update_interval=interval)
    assert all(c == [6, 12] for c in _refresh_steps(plain, q, 3 * interval).values())


def test_staggered_offsets_spread_consecutive_keys_evenly():
    """Unnamed parameters have consecutive keys: one refresh per step, none on the same one."""
    params = [torch.nn.Parameter(torch.randn(8, 12)) for _ in range(4)]
    with pytest.warns(UserWarning):  # unnamed parameters of a randomized rule
        opt = slimopt.GaLore(params, lr=1e-2, rank=2, update_interval=4, stagger_refresh=True,
                             svd="randomized")
    offsets = sorted(opt._param_keys[p] % 4 for p in params)
    assert offsets == [0, 1, 2, 3]


def test_staggered_grassjump_resumes_exactly_mid_interval(tmp_path):
    """The regenerated basis uses the shifted interval index: a resume between two shifted
    refreshes regenerates the same basis."""
    names = [f"w{i}" for i in range(6)]
    hyper = dict(lr=1e-2, rank=4, update_interval=5, stagger_refresh=True)
    straight = _params()
    _run(slimopt.GrassJump(list(zip(names, straight)), **hyper), straight, 12)
    first = _params()
    opt = slimopt.GrassJump(list(zip(names, first)), **hyper)
    _run(opt, first, 7)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = slimopt.GrassJump(list(zip(names, second)), **hyper)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for t in range(7, 12):
        for p, grad in zip(second, _grads(second, t)):
            p.grad = grad
        resumed.step()
    for a, b in zip(second, straight):
        assert torch.equal(a, b)


def test_grassjump_stored_basis_is_the_regenerated_one():
    names = [f"w{i}" for i in range(6)]
    hyper = dict(lr=1e-2, rank=4, update_interval=3)
    drawn, stored = _params(), _params()
    a = slimopt.GrassJump(list(zip(names, drawn)), **hyper)
    b = slimopt.GrassJump(list(zip(names, stored)), store_basis=True, **hyper)
    _run(a, drawn, 7)
    _run(b, stored, 7)
    for p, q in zip(drawn, stored):
        assert torch.equal(p, q)
        assert "basis" not in a.state[p] and torch.equal(b.state[q]["basis"], a.current_basis(p))
    d_r = sum(min(p.shape) * 4 for p in stored)
    assert slimopt.state_bytes(b) - slimopt.state_bytes(a) == 4 * d_r


def test_randomized_svd_option_finds_the_top_subspace_of_a_gapped_gradient():
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 64, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.full((8,), 10.0), torch.full((56,), 0.01)]).double()
    grad = (u * sigma) @ v.T
    exact = TopSVD().next(None, grad, 8, Draws(0, 0, 0))
    approx = TopSVD("randomized").next(None, grad, 8, Draws(0, 0, 0))
    torch.testing.assert_close(approx @ approx.T, exact @ exact.T, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="svd"):
        slimopt.GaLore([torch.nn.Parameter(torch.zeros(4, 6))], svd="lanczos")


def test_exact_svd_is_taken_of_the_tall_orientation_with_fixed_signs(monkeypatch):
    shapes = []
    original = torch.linalg.svd

    def spy(mat, *args, **kwargs):
        shapes.append(tuple(mat.shape))
        return original(mat, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "svd", spy)
    grad = torch.randn(10, 30, dtype=torch.float64)
    basis = TopSVD().next(None, grad, 3, Draws(0, 0, 0))
    assert shapes == [(30, 10)]
    peak = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))
    assert (peak > 0).all()
    u = original(grad, full_matrices=False)[0][:, :3]
    torch.testing.assert_close(basis.abs(), u.abs(), rtol=0, atol=1e-12)


def test_policy_is_built_once_per_option_set(monkeypatch):
    built = []
    params = _params()
    opt = slimopt.GrassWalk([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, rank=4,
                            update_interval=3)
    original = type(opt).policy_from_group
    monkeypatch.setattr(type(opt), "policy_from_group",
                        staticmethod(lambda group: built.append(1) or original(group)))
    _run(opt, params, 5)
    assert len(built) <= 1


def test_compiled_step_matches_eager_in_one_graph_per_shape():
    """compile=True: inductor on the CPU, every batch of a shape in one graph, no graph break
    (fullgraph), and the same trajectory as eager up to float32 rounding."""
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    shapes = [(8, 16), (8, 16), (16, 8)]  # one canonical shape: a single graph
    runs = {}
    for compile_ in (False, True):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = slimopt.GrassWalk([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, rank=3,
                                update_interval=2, compile=compile_)
        for t in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[compile_] = params
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_run_diagnostics_follow_the_staggered_schedule():
    """slimopt-pretrain's logged diagnostics: the subspace move is measured at each matrix's own
    refreshes, and the limiter's norms (device scalars) come back as a plain float."""
    from slimopt.launch.run_logger import SubspaceDiagnostics
    params = _params()
    opt = slimopt.GrassWalk([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, rank=4,
                            update_interval=4, stagger_refresh=True)
    diagnostics, moved_at = SubspaceDiagnostics(), []
    for t in range(12):
        for p, grad in zip(params, _grads(params, t)):
            p.grad = grad
        opt.step()
        out = diagnostics.collect(opt)
        assert isinstance(out["optimizer/recovery_norm"], float)
        assert out["optimizer/recovery_norm"] > 0
        if "optimizer/subspace_move" in out:
            moved_at.append(t)
    offsets = {opt.state[p]["key"] % 4 for p in params}
    assert moved_at == [t for t in range(1, 12) if any((t + o) % 4 == 0 for o in offsets)]


def test_batches_are_bounded_in_count_and_bytes(monkeypatch):
    """At most 8 matrices a batch, and at most batch_bytes of gradients: a large matrix steps
    alone (the transient r x k tensors of a batch stay bounded on large models)."""
    sizes = []
    original = slimopt.GaLore._step_matrices
    monkeypatch.setattr(slimopt.GaLore, "_step_matrices",
                        lambda self, group, batch: (sizes.append(len(batch)),
                                                    original(self, group, batch))[1])
    small = [torch.nn.Parameter(torch.randn(8, 12)) for _ in range(11)]
    opt = slimopt.GaLore([(f"s{i}", p) for i, p in enumerate(small)], lr=1e-2, rank=2)
    for p in small:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(sizes) == [3, 8]
    sizes.clear()
    opt.batch_bytes = 2 * 8 * 12 * 4  # two gradients' bytes
    for p in small:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sizes == [2, 2, 2, 2, 2, 1]
