"""Projection onto an orthonormal basis and back, Triton or pure torch (``dispatch.backend``).

Every subspace optimizer works in the canonical orientation ``grad: d x k`` with ``d <= k`` and a
basis ``S: d x r``: ``project(S, G) = S^T G`` (r x k) and ``project_back(S, N) = S N`` (d x k).
``project_adam_moments_`` is ``project`` followed by the Adam moment update; in Triton it is one
kernel, the update done on the tile of ``S^T G`` before it leaves registers. The Triton kernels take
float32, bfloat16 and float16; other dtypes (float64) always use torch.
"""
from __future__ import annotations

import torch

from .dispatch import backend

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(*tensors: torch.Tensor) -> bool:
    """``backend`` says Triton and the kernels take every tensor's dtype."""
    return backend(*tensors) == "triton" and all(t.dtype in TRITON_DTYPES for t in tensors)


def project(basis: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``S^T G``: coordinates of ``grad`` in the subspace spanned by ``basis``'s columns."""
    if use_triton(basis, grad):
        from . import triton_projection
        return triton_projection.project(basis, grad)
    return basis.transpose(0, 1) @ grad


def project_back(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``S N``: the full-size matrix whose subspace coordinates are ``coeffs``."""
    if use_triton(basis, coeffs):
        from . import triton_projection
        return triton_projection.project_back(basis, coeffs)
    return basis @ coeffs


def project_adam_moments_(basis: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                          exp_avg_sq: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """``R = S^T G``, returned, after updating the moments in place (in their own dtype):
    ``exp_avg.lerp_(R, 1 - beta1)``, ``exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)``.
    """
    if use_triton(basis, grad, exp_avg, exp_avg_sq):
        from . import triton_projection
        return triton_projection.project_adam_moments_(basis, grad, exp_avg, exp_avg_sq,
                                                       beta1, beta2)
    projected = basis.transpose(0, 1) @ grad
    r = projected.to(exp_avg.dtype)  # lerp_ wants one dtype; a no-op when they agree
    exp_avg.lerp_(r, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    return projected
