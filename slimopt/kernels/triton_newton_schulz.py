"""Newton-Schulz in Triton: a symmetric Gram kernel and the matmul of ``triton_projection``.

Per step, for ``X`` (m x n, m <= n) and coefficients ``(a, b, c)``::

    A = X X^T                 gram(X)                               one triangle of tiles
    P = b A + c A A^T         gram(A, alpha=c, addend=A, beta=b)    A A = A A^T: A is symmetric
    X <- a X + P X            matmul(P, X, addend=X, beta=a)

so a step costs about ``3 m^2 n + m^3`` multiply-adds (times 2 FLOPs) instead of the dense
``4 m^2 n + 2 m^3``. Every intermediate is stored in the working dtype (bfloat16 by default) at the
same points as the torch reference ``newton_schulz_torch``; kernels accumulate in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .triton_projection import (check_matrix, dot_options, launch_config, matmul, on_device,
                                store_axpby, tile_dot, tile_ptrs, with_addend)


@triton.jit
def lower_tile(pid):
    """The ``pid``-th tile ``(i, j)``, ``j <= i``, of the lower triangle, row by row."""
    i = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)  # float rounding, either way
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    return i, pid - i * (i + 1) // 2


@triton.jit
def _gram_kernel(X, C, Out, M, K, s_xm, s_xk, s_cm, s_cn, s_om, s_on, alpha, beta,
                 HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, FIX_INTERPRETER: tl.constexpr):
    """Tile ``(i, j)``, ``i >= j``, of ``Out = alpha X X^T + beta C`` (``C`` symmetric, only when
    ``HAS_C``), stored at ``(i, j)`` and, transposed, at ``(j, i)``."""
    i, j = lower_tile(tl.program_id(0))
    acc = tile_dot(X, X, M, M, K, s_xm, s_xk, s_xk, s_xm, i, j, BLOCK, BLOCK, BLOCK_K,
                   PRECISION, FIX_INTERPRETER)
    tile = store_axpby(acc, Out, C, i, j, M, M, s_om, s_on, s_cm, s_cn, alpha, beta, HAS_C, BLOCK,
                       BLOCK, FIX_INTERPRETER)
    if i != j:
        mirror_ptrs, mirror_mask = tile_ptrs(Out, j, i, M, M, s_om, s_on, BLOCK, BLOCK)
        tl.store(mirror_ptrs, tl.trans(tile), mask=mirror_mask)


def gram_tiles(m: int, block: int) -> int:
    """How many tiles the Gram kernel computes for an m x m result: the lower triangle."""
    tiles = triton.cdiv(m, block)
    return tiles * (tiles + 1) // 2


def gram(x: torch.Tensor, out: torch.Tensor | None = None, *, alpha: float = 1.0,
         addend: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """``out = alpha x x^T + beta addend`` (m x m) computing only the lower triangle of tiles;
    ``addend`` must be symmetric (only its lower triangle of tiles is read)."""
    check_matrix("x", x)
    m, k = x.shape
    out, c = with_addend(out, addend, (m, m), x)
    if out.numel() == 0:
        return out
    config = launch_config("matmul", x.dtype)
    block = config.pop("BLOCK_M")
    del config["BLOCK_N"], config["GROUP_M"]
    with on_device(x):
        _gram_kernel[(gram_tiles(m, block),)](
            x, c, out, m, k, *x.stride(), *c.stride(), *out.stride(), float(alpha),
            float(beta), HAS_C=addend is not None, BLOCK=block, **dot_options(x.dtype),
            **config)
    return out


def newton_schulz(grad: torch.Tensor, coefficients: Sequence[Sequence[float]],
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Same contract as ``newton_schulz_torch`` (orthogonalized ``grad`` in ``dtype``, same
    shape), with the three products of each step in Triton."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 2:
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"newton_schulz expects a 2-D matrix, got shape {got}")
    x = grad.to(dtype)
    check_matrix("grad (in dtype)", x)
    tall = grad.shape[0] > grad.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # a new tensor: from here on a work buffer
    m = x.shape[0]
    gram_x = torch.empty((m, m), dtype=dtype, device=x.device)
    poly = torch.empty_like(gram_x)
    spare = torch.empty_like(x)
    for a, b, c in coefficients:
        gram(x, out=gram_x)
        gram(gram_x, out=poly, alpha=c, addend=gram_x, beta=b)
        x, spare = matmul(poly, x, out=spare, addend=x, beta=a), x
    return x.T if tall else x
