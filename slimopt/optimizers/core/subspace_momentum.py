"""Subspace-Momentum (Nguyen & Nguyen, arXiv 2411.07120) as a pure function.

Momentum lives only in the subspace of basis ``S`` (``d x r``); the orthogonal complement gets
plain SGD: ``m <- beta1 m + (1 - beta1) S^T g``, direction ``S m + (g - S S^T g)``. With a full
square basis the residual vanishes and this is EMA-momentum SGD.
"""
from __future__ import annotations

import torch

from ...kernels import project, project_back


def subspace_momentum_direction_(basis: torch.Tensor, grad: torch.Tensor,
                                 exp_avg: torch.Tensor, beta1: float) -> torch.Tensor:
    """Update ``exp_avg`` (r x k) in place and return ``S m + (g - S S^T g)`` (d x k)."""
    projected = project(basis, grad)
    # exp_avg may be a float32 work tensor of a half-precision matrix (a low-precision state):
    # casts that are no-ops when the dtypes agree
    exp_avg.lerp_(projected.to(exp_avg.dtype), 1.0 - beta1)
    return project_back(basis, (exp_avg - projected).to(basis.dtype)).add_(grad)
