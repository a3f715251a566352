"""Newton-Schulz orthogonalization with given per-step coefficients (pure-torch reference).

``X_0 = G / max(||G||_F, eps)`` (transposed first when ``m > n`` so that ``X X^T`` is the small
Gram matrix), then for each step's ``(a, b, c)``::

    A = X X^T;   X <- a X + (b A + c A A) X

With every step at Muon's ``(3.4445, -4.7750, 2.0315)`` and ``dtype=torch.bfloat16`` this is
exactly ``torch.optim.Muon``'s ``_zeropower_via_newtonschulz`` (same operation order).

``newton_schulz`` is the entry point: Triton (``triton_newton_schulz``) or this reference, as
``dispatch.backend`` decides.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .dispatch import backend
from .projection import TRITON_DTYPES

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_torch(grad: torch.Tensor, coefficients: Sequence[Sequence[float]],
                        eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference: returns the orthogonalized matrix in ``dtype``, same shape as ``grad``."""
    if grad.dim() != 2:
        raise ValueError(f"newton_schulz expects a 2-D matrix, got shape {tuple(grad.shape)}")
    x = grad.to(dtype)
    tall = grad.shape[0] > grad.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for a, b, c in coefficients:
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def newton_schulz(grad: torch.Tensor, coefficients: Sequence[Sequence[float]],
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonalized ``grad`` in ``dtype``, same shape: Triton or the torch reference (always
    torch for a ``dtype`` the Triton kernels do not take, such as float64)."""
    if backend(grad) == "triton" and dtype in TRITON_DTYPES:
        from . import triton_newton_schulz
        return triton_newton_schulz.newton_schulz(grad, coefficients, eps, dtype)
    return newton_schulz_torch(grad, coefficients, eps, dtype)
