"""Triton kernels for the subspace projection: ``S^T G``, ``S N``, and ``S^T G`` fused with Adam.

Every kernel here (and the Newton-Schulz kernels, which build on this module) is one tiled matmul
over strided operands: a transposed operand such as ``S^T`` is a swap of its two strides, never a
copy, and slices or transposed views work as they are. Tiles accumulate in float32; a result is
written in its output tensor's dtype, and masks make any size work (odd sizes, a single row).

The wrappers take an optional ``out=`` (any strides; it must not overlap the inputs) and check
shapes, dtypes and devices with a ``ValueError`` naming the argument. Supported dtypes: float32,
bfloat16 and float16 (operands of one call share a dtype; the Adam moments may have their own).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .projection import TRITON_DTYPES as SUPPORTED_DTYPES

# Tile sizes. The interpreter runs every program instance in numpy, so tests use small tiles (still
# several per dimension on their 33 x 70 shapes); on a GPU, the usual tensor-core tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
CUDA_CONFIGS = {
    "matmul": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    # The moment epilogue holds two more float32 tiles: a narrower tile keeps it out of spills.
    "moments": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
}


def launch_config(kind: str, dtype: torch.dtype) -> dict:
    """Block sizes (and, on a GPU, warps and pipeline stages) for a ``kind`` of kernel."""
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    config = dict(CUDA_CONFIGS[kind])
    if dtype == torch.float32:  # 4-byte operands: halve the k-tile to keep the shared memory
        config["BLOCK_K"] = 32
    return config


def dot_options(dtype: torch.dtype) -> dict:
    """Options of every kernel: ``tl.dot``'s precision for float32 follows
    ``torch.get_float32_matmul_precision()`` ("highest" is IEEE, anything else TF32), as torch's
    own matmul does; ``FIX_INTERPRETER`` turns on the work-arounds in ``tile_dot`` and ``rounded``
    for Triton 3.9's interpreter, which mishandles bfloat16."""
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(PRECISION="ieee" if ieee else "tf32", FIX_INTERPRETER=interpreting())


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), grouped: ``GROUP_M`` consecutive programs share
    their column tiles of B, so those stay in L2 cache."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def tile_dot(A, B, M, N, K, s_am, s_ak, s_bk, s_bn, pid_m, pid_n, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
             FIX_INTERPRETER: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of ``A @ B`` in float32, for strided ``A`` (M x K) and ``B``
    (K x N); rows, columns and k past the ends read as 0. The interpreter multiplies bfloat16 bit
    patterns as integers in ``tl.dot``: there operands are upcast to float32 first (a product of
    two 16-bit floats is exact in float32, so only the summation order can differ)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = B + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        if FIX_INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc


@triton.jit
def tile_ptrs(P, pid_m, pid_n, M, N, s_m, s_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to tile ``(pid_m, pid_n)`` of a strided M x N matrix, and the in-range mask."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return P + rm[:, None] * s_m + rn[None, :] * s_n, (rm[:, None] < M) & (rn[None, :] < N)


@triton.jit
def rounded(x, dtype: tl.constexpr, FIX_INTERPRETER: tl.constexpr):
    """Float32 ``x`` cast to ``dtype``, rounding to nearest even as the GPU does. The interpreter
    truncates float32 to bfloat16 instead, so there the rounding is done on the bits first, and
    the low bits cleared so that its truncation is exact (it mangles float32 subnormals, and
    ``0 + 0x7FFF`` would be one)."""
    if FIX_INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def store_axpby(acc, Out, C, pid_m, pid_n, M, N, s_om, s_on, s_cm, s_cn, alpha, beta,
                HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                FIX_INTERPRETER: tl.constexpr):
    """The epilogue: ``alpha acc + beta C`` (``C`` only when ``HAS_C``) stored as tile
    ``(pid_m, pid_n)`` of ``Out`` in its dtype; returns the stored tile."""
    out_ptrs, mask = tile_ptrs(Out, pid_m, pid_n, M, N, s_om, s_on, BLOCK_M, BLOCK_N)
    if HAS_C:
        c_ptrs, _ = tile_ptrs(C, pid_m, pid_n, M, N, s_cm, s_cn, BLOCK_M, BLOCK_N)
        acc = alpha * acc + beta * tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    elif alpha != 1.0:
        acc = alpha * acc
    tile = rounded(acc, Out.dtype.element_ty, FIX_INTERPRETER)
    tl.store(out_ptrs, tile, mask=mask)
    return tile


@triton.jit
def _matmul_kernel(A, B, C, Out, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_om, s_on,
                   alpha, beta, HAS_C: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   PRECISION: tl.constexpr, FIX_INTERPRETER: tl.constexpr):
    """One tile of ``Out = alpha A @ B + beta C`` (``C`` only when ``HAS_C``)."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tile_dot(A, B, M, N, K, s_am, s_ak, s_bk, s_bn, pid_m, pid_n, BLOCK_M, BLOCK_N,
                   BLOCK_K, PRECISION, FIX_INTERPRETER)
    store_axpby(acc, Out, C, pid_m, pid_n, M, N, s_om, s_on, s_cm, s_cn, alpha, beta, HAS_C,
                BLOCK_M, BLOCK_N, FIX_INTERPRETER)


@triton.jit
def _project_moments_kernel(S, G, R, M1, M2, D, RANK, N, s_sd, s_sr, s_gd, s_gn, s_rm, s_rn,
                            s_m1m, s_m1n, s_m2m, s_m2n, weight1, beta2, weight2,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                            FIX_INTERPRETER: tl.constexpr):
    """One tile of ``R = S^T G`` (``S^T`` by strides), then, while the tile is in registers, the
    Adam moments: ``M1 <- lerp(M1, R, weight1)``, ``M2 <- beta2 M2 + weight2 R^2``.

    The moments see ``R`` rounded to its dtype, as the unfused ``project`` + update does; each
    moment is rounded to its own dtype at the same points as torch's ``lerp_``,
    ``mul_`` + ``addcmul_``."""
    pid_m, pid_n = tile_coords(RANK, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tile_dot(S, G, RANK, N, D, s_sr, s_sd, s_gd, s_gn, pid_m, pid_n, BLOCK_M, BLOCK_N,
                   BLOCK_K, PRECISION, FIX_INTERPRETER)
    r_ptrs, mask = tile_ptrs(R, pid_m, pid_n, RANK, N, s_rm, s_rn, BLOCK_M, BLOCK_N)
    r = rounded(acc, R.dtype.element_ty, FIX_INTERPRETER)
    tl.store(r_ptrs, r, mask=mask)
    r = r.to(tl.float32)
    m1_ptrs, _ = tile_ptrs(M1, pid_m, pid_n, RANK, N, s_m1m, s_m1n, BLOCK_M, BLOCK_N)
    m1 = tl.load(m1_ptrs, mask=mask, other=0.0).to(tl.float32)
    if weight1 < 0.5:  # torch's lerp, both branches
        m1 = m1 + weight1 * (r - m1)
    else:
        m1 = r - (r - m1) * (1.0 - weight1)
    tl.store(m1_ptrs, rounded(m1, M1.dtype.element_ty, FIX_INTERPRETER), mask=mask)
    m2_ptrs, _ = tile_ptrs(M2, pid_m, pid_n, RANK, N, s_m2m, s_m2n, BLOCK_M, BLOCK_N)
    m2 = tl.load(m2_ptrs, mask=mask, other=0.0).to(tl.float32)
    m2 = rounded(m2 * beta2, M2.dtype.element_ty, FIX_INTERPRETER).to(tl.float32)
    tl.store(m2_ptrs, rounded(m2 + weight2 * r * r, M2.dtype.element_ty, FIX_INTERPRETER),
             mask=mask)


def check_matrix(name: str, t: torch.Tensor, shape=None, dtype=None, device=None) -> None:
    """``ValueError`` unless ``t`` is a 2-D tensor of a supported dtype (and the given shape --
    ``None`` for any size --, dtype and device where those are given)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {got}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported by the Triton kernels "
                         f"(supported: {[str(d) for d in SUPPORTED_DTYPES]})")
    if shape is not None and not all(want in (None, got) for want, got in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other operands on {device}")
    if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31:
        raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()} spans 2^31 "
                         "elements or more: the kernels index with int32")


def output(out, shape, like: torch.Tensor) -> torch.Tensor:
    """``out`` checked against ``shape`` and ``like``'s dtype and device, or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_matrix("out", out, shape, like.dtype, like.device)
    return out


def with_addend(out, addend, shape, like: torch.Tensor):
    """``(out, C)`` for a kernel with the ``alpha A B + beta C`` epilogue: ``out`` as ``output``
    makes it, and ``C`` the checked ``addend``, or ``out`` as a never-read placeholder."""
    out = output(out, shape, like)
    if addend is None:
        return out, out
    check_matrix("addend", addend, shape, device=like.device)
    return out, addend


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *,
           alpha: float = 1.0, addend: torch.Tensor | None = None,
           beta: float = 0.0) -> torch.Tensor:
    """``out = alpha a @ b + beta addend`` (``addend`` optional, any supported dtype)."""
    check_matrix("a", a)
    check_matrix("b", b, (a.shape[1], None), a.dtype, a.device)
    m, k = a.shape
    n = b.shape[1]
    out, c = with_addend(out, addend, (m, n), a)
    if out.numel() == 0:
        return out
    config = launch_config("matmul", a.dtype)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    with on_device(a):
        _matmul_kernel[grid](a, b, c, out, m, n, k, *a.stride(), *b.stride(), *c.stride(),
                             *out.stride(), float(alpha), float(beta), HAS_C=addend is not None,
                             **dot_options(a.dtype), **config)
    return out


def project(basis: torch.Tensor, grad: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``S^T G`` (r x k) for ``basis`` S (d x r) and ``grad`` G (d x k); ``S^T`` by strides."""
    check_matrix("basis", basis)
    return matmul(basis.transpose(0, 1), grad, out)


def project_back(basis: torch.Tensor, coeffs: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``S N`` (d x k) for ``basis`` S (d x r) and ``coeffs`` N (r x k)."""
    return matmul(basis, coeffs, out)


def project_adam_moments_(basis: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                          exp_avg_sq: torch.Tensor, beta1: float, beta2: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``R = S^T G``, returned, with the Adam moments (r x k, their own dtype) updated in place
    in the same kernel: ``exp_avg.lerp_(R, 1 - beta1)``,
    ``exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)``."""
    check_matrix("basis", basis)
    d, rank = basis.shape
    check_matrix("grad", grad, (d, None), basis.dtype, basis.device)
    n = grad.shape[1]
    check_matrix("exp_avg", exp_avg, (rank, n), device=basis.device)
    check_matrix("exp_avg_sq", exp_avg_sq, (rank, n), device=basis.device)
    out = output(out, (rank, n), basis)
    if out.numel() == 0:
        return out
    config = launch_config("moments", basis.dtype)
    grid = (triton.cdiv(rank, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    with on_device(basis):
        _project_moments_kernel[grid](
            basis, grad, out, exp_avg, exp_avg_sq, d, rank, n, *basis.stride(), *grad.stride(),
            *out.stride(), *exp_avg.stride(), *exp_avg_sq.stride(), 1.0 - beta1, float(beta2),
            1.0 - beta2, **dot_options(basis.dtype), **config)
    return out
