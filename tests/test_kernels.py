"""Every Triton kernel against the torch reference, on the CPU under Triton's interpreter.

Shapes are awkward on purpose (odd sizes, a single row or column, m < n and m > n, transposed
views and step-2 slices) and always span several 16-wide interpreter tiles. Errors are relative
Frobenius errors against float64 results computed from the same (rounded) inputs. Outputs are
poisoned with NaN first, so an element a kernel fails to write fails the test.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (or a module importing it) is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from slimopt.kernels import (MUON_COEFFICIENTS, newton_schulz, newton_schulz_torch,  # noqa: E402
                             project, project_adam_moments_, project_back)
from slimopt.kernels import triton_newton_schulz as tns  # noqa: E402
from slimopt.kernels import triton_projection as tp  # noqa: E402
from slimopt.kernels.dispatch import backend  # noqa: E402

# Relative Frobenius error bounds (the largest error seen on these cases in the comments).
# One product (projection, Gram, matmul + epilogue, fused Adam moments): float32 differs from
# float64 by summation order only; bfloat16 by at most two roundings to nearest (2 x 2^-9).
PRODUCT_RTOL = {torch.float32: 1e-6,    # seen 1.0e-7
                torch.bfloat16: 5e-3}   # seen 2.1e-3
# Newton-Schulz: roundings of X, X X^T and the polynomial compound over the steps. Two steps vs
# float64: float32 seen 2.3e-7, bfloat16 3.8e-3; five Muon steps vs torch's own reference in the
# same dtype: float32 1.5e-6, bfloat16 0 to 1.3e-3, mostly bit-identical (torch's bfloat16
# itself is 1.6e-2 off float64).
NS_RTOL = {torch.float32: 5e-6,
           torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
BLOCK = tp.INTERPRETER_CONFIG["BLOCK_M"]
# Two different steps: per-step coefficients (Muon's, then ROOT's 2048x8192 ones).
TWO_STEPS = [MUON_COEFFICIENTS, (2.9794, -3.6674, 1.6207)]


def matrix(kind, rows, cols, dtype):
    """A rows x cols matrix: contiguous, a transposed view, or a slice taking every other column."""
    if kind == "transposed":
        return torch.randn(cols, rows).to(dtype).T
    if kind == "strided":
        return torch.randn(rows, 2 * cols).to(dtype)[:, ::2]
    return torch.randn(rows, cols).to(dtype)


# (layout, rows, cols) for single-matrix kernels (Gram, Newton-Schulz)
MATRICES = [("contiguous", 33, 70), ("contiguous", 70, 33), ("contiguous", 1, 17),
            ("contiguous", 17, 1), ("transposed", 33, 70), ("strided", 70, 33)]
# (layout of the basis, layout of the other operand, d, r, k) for the projection kernels
PROJECTIONS = [("contiguous", "contiguous", 33, 17, 70), ("contiguous", "contiguous", 70, 33, 17),
               ("contiguous", "contiguous", 17, 1, 33), ("contiguous", "contiguous", 1, 1, 17),
               ("contiguous", "contiguous", 17, 5, 1), ("transposed", "strided", 33, 17, 70),
               ("strided", "transposed", 70, 33, 17)]


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def poisoned(rows, cols, dtype):
    return torch.full((rows, cols), float("nan"), dtype=dtype)


def ids(value):
    return "-".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


# ---- projection kernels --------------------------------------------------------------------

@pytest.mark.parametrize("case", PROJECTIONS, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_and_project_back(case, dtype):
    basis_kind, other_kind, d, r, k = case
    basis = matrix(basis_kind, d, r, dtype)
    grad = matrix(other_kind, d, k, dtype)
    coeffs = matrix(other_kind, r, k, dtype)
    got = tp.project(basis, grad, out=poisoned(r, k, dtype))
    assert got.dtype == dtype
    assert relative_error(got, basis.double().T @ grad.double()) < PRODUCT_RTOL[dtype]
    got = tp.project_back(basis, coeffs, out=poisoned(d, k, dtype))
    assert relative_error(got, basis.double() @ coeffs.double()) < PRODUCT_RTOL[dtype]


@pytest.mark.parametrize("case", PROJECTIONS, ids=ids)
@pytest.mark.parametrize("dtype,moment_dtype", [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)], ids=str)
def test_fused_projected_adam_moments(case, dtype, moment_dtype):
    basis_kind, other_kind, d, r, k = case
    beta1, beta2 = 0.9, 0.999
    basis = matrix(basis_kind, d, r, dtype)
    grad = matrix(other_kind, d, k, dtype)
    exp_avg = matrix(other_kind, r, k, moment_dtype)
    exp_avg_sq = matrix(other_kind, r, k, moment_dtype).abs()
    want_r = basis.double().T @ grad.double()
    want_m = exp_avg.double().lerp(want_r, 1 - beta1)
    # torch rounds beta2 * v to the moment dtype before adding: in bfloat16 that step alone is
    # off by up to 2^-9 from exact arithmetic, so the reference rounds there too
    want_v = exp_avg_sq.mul(beta2).double() + (1 - beta2) * want_r ** 2
    got = tp.project_adam_moments_(basis, grad, exp_avg, exp_avg_sq, beta1, beta2,
                                   out=poisoned(r, k, dtype))
    assert got.dtype == dtype and exp_avg.dtype == exp_avg_sq.dtype == moment_dtype
    assert relative_error(got, want_r) < PRODUCT_RTOL[dtype]
    assert relative_error(exp_avg, want_m) < PRODUCT_RTOL[dtype]
    assert relative_error(exp_avg_sq, want_v) < PRODUCT_RTOL[dtype]


def test_fused_moments_match_the_unfused_torch_path():
    """Same R, and moments within float32 rounding, as ``project`` + the torch update."""
    basis, grad = torch.randn(33, 17), torch.randn(33, 70)
    m, v = torch.randn(17, 70), torch.rand(17, 70)
    m_ref, v_ref = m.clone(), v.clone()
    ref = project_adam_moments_(basis, grad, m_ref, v_ref, 0.8, 0.95)  # torch on CPU
    got = tp.project_adam_moments_(basis, grad, m, v, 0.8, 0.95)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_with_epilogue(dtype):
    a = matrix("transposed", 33, 40, dtype)
    b = matrix("strided", 40, 70, dtype)
    c = matrix("transposed", 33, 70, torch.float32)
    got = tp.matmul(a, b, out=poisoned(33, 70, dtype), alpha=-0.5, addend=c, beta=3.0)
    want = -0.5 * a.double() @ b.double() + 3.0 * c.double()
    assert relative_error(got, want) < PRODUCT_RTOL[dtype]


# ---- Newton-Schulz kernels -----------------------------------------------------------------

@pytest.mark.parametrize("case", MATRICES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_symmetric_gram(case, dtype):
    """One triangle of tiles computed, the whole matrix right, off-diagonal tiles mirrored."""
    x = matrix(*case, dtype)
    m = x.shape[0]
    gram = tns.gram(x, out=poisoned(m, m, dtype))
    assert relative_error(gram, x.double() @ x.double().T) < PRODUCT_RTOL[dtype]
    tile = torch.arange(m) // BLOCK
    off_diagonal = tile[:, None] != tile[None, :]
    assert torch.equal(gram[off_diagonal], gram.T[off_diagonal])
    # the polynomial of a step: b A + c A A^T, A symmetric
    poly = tns.gram(gram, out=poisoned(m, m, dtype), alpha=2.0315, addend=gram, beta=-4.775)
    want = 2.0315 * gram.double() @ gram.double() - 4.775 * gram.double()
    assert relative_error(poly, want) < PRODUCT_RTOL[dtype]


def test_gram_launches_only_the_lower_triangle():
    assert tns.gram_tiles(33, BLOCK) == 6  # 3 x 3 tiles: 6 of 9
    assert tns.gram_tiles(8192, 128) == 64 * 65 // 2


# Non-contiguous inputs in float32 only: converting to bfloat16 copies a slice (it would test
# nothing new), and the interpreter is slow.
@pytest.mark.parametrize("case,dtype", [(case, dtype) for case in MATRICES for dtype in DTYPES
                                        if case[0] == "contiguous" or dtype == torch.float32],
                         ids=ids)
def test_newton_schulz_triton(case, dtype):
    grad = matrix(*case, torch.float32)
    got = tns.newton_schulz(grad, TWO_STEPS, dtype=dtype)
    want = newton_schulz_torch(grad.double(), TWO_STEPS, dtype=torch.float64)
    assert got.shape == grad.shape and got.dtype == dtype
    assert relative_error(got, want) < NS_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_newton_schulz_triton_matches_torch_in_its_dtype(dtype):
    grad = torch.randn(70, 33)
    got = tns.newton_schulz(grad, [MUON_COEFFICIENTS] * 5, dtype=dtype)
    want = newton_schulz_torch(grad, [MUON_COEFFICIENTS] * 5, dtype=dtype)
    assert relative_error(got, want) < NS_RTOL[dtype]


def test_newton_schulz_triton_of_zero_is_zero():
    got = tns.newton_schulz(torch.zeros(17, 33), [MUON_COEFFICIENTS], dtype=torch.float32)
    assert torch.equal(got, torch.zeros(17, 33))


def test_triton_wrappers_reject_bad_input():
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match="b must have shape"):
        tp.matmul(x, torch.randn(6, 3))
    with pytest.raises(ValueError, match="must have dtype"):
        tp.matmul(x, torch.randn(7, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not supported"):
        tp.project(x.double(), x.double())
    with pytest.raises(ValueError, match="out must have shape"):
        tp.project(x, x, out=torch.empty(7, 6))
    with pytest.raises(ValueError, match="exp_avg_sq must have shape"):
        tp.project_adam_moments_(x[:, :3], x, torch.zeros(3, 7), torch.zeros(7, 3), 0.9, 0.99)
    with pytest.raises(ValueError, match="2-D"):
        tns.newton_schulz(torch.randn(3, 4, 5), [MUON_COEFFICIENTS])


# ---- dispatch ------------------------------------------------------------------------------

@pytest.fixture
def triton_calls(monkeypatch):
    """The Triton entry points, wrapped to record their names when called."""
    seen = []
    for module, name in [(tp, "project"), (tp, "project_back"), (tp, "project_adam_moments_"),
                         (tns, "newton_schulz")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: (seen.append(_n),
                                                                             _f(*a, **k))[1])
    return seen


def _call_all_four():
    basis, grad = torch.randn(17, 5), torch.randn(17, 33)
    project(basis, grad)
    project_back(basis, torch.randn(5, 33))
    project_adam_moments_(basis, grad, torch.zeros(5, 33), torch.zeros(5, 33), 0.9, 0.99)
    newton_schulz(torch.randn(17, 1), [MUON_COEFFICIENTS])


def test_dispatch_cpu_uses_torch_by_default(monkeypatch, triton_calls):
    monkeypatch.delenv("SLIMOPT_KERNELS", raising=False)
    assert backend(torch.zeros(2)) == "torch"
    _call_all_four()
    assert triton_calls == []


@pytest.mark.parametrize("forced,expected", [("torch", "torch"), ("triton", "triton")])
def test_dispatch_override(monkeypatch, triton_calls, forced, expected):
    monkeypatch.setenv("SLIMOPT_KERNELS", forced)
    assert backend(torch.zeros(2)) == expected
    _call_all_four()
    assert len(triton_calls) == (4 if expected == "triton" else 0)


def test_dispatch_keeps_float64_in_torch(monkeypatch, triton_calls):
    monkeypatch.setenv("SLIMOPT_KERNELS", "triton")
    basis, grad = torch.randn(17, 5, dtype=torch.float64), torch.randn(17, 33, dtype=torch.float64)
    assert torch.equal(project(basis, grad), basis.T @ grad)
    assert torch.equal(project_back(basis, grad[:5]), basis @ grad[:5])
    newton_schulz(grad, [MUON_COEFFICIENTS], dtype=torch.float64)
    assert triton_calls == []


def test_dispatch_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("SLIMOPT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        project(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        newton_schulz(torch.randn(4, 3), [MUON_COEFFICIENTS])


@pytest.mark.parametrize("shape", [(33, 70), (70, 33)], ids=str)
def test_newton_schulz_torch_backend_is_torch_muon(monkeypatch, shape):
    muon = pytest.importorskip("torch.optim._muon")
    monkeypatch.delenv("SLIMOPT_KERNELS", raising=False)
    grad = torch.randn(*shape)
    want = muon._zeropower_via_newtonschulz(grad, MUON_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(newton_schulz(grad, coefficients=[MUON_COEFFICIENTS] * 5), want)



def test_grasswalk_step_on_triton_matches_torch(monkeypatch):
    """A GrassWalk step (batched: the Triton projection per matrix, what CUDA runs) against the
    torch path, on a batch of three same-shape matrices with recovery."""
    import slimopt
    runs = {}
    for forced in ("torch", "triton"):
        monkeypatch.setenv("SLIMOPT_KERNELS", forced)
        g = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(33, 50, generator=g)) for _ in range(3)]
        opt = slimopt.GrassWalk([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, rank=7,
                                update_interval=2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[forced] = params
    for a, b in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
