"""Projection onto an orthonormal basis and back (pure-torch reference).

Every subspace optimizer works in the canonical orientation ``grad: d x k`` with ``d <= k`` and a
basis ``S: d x r``: ``project(S, G) = S^T G`` (r x k) and ``project_back(S, N) = S N`` (d x k).
"""
from __future__ import annotations

import torch


def project(basis: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``S^T G``: coordinates of ``grad`` in the subspace spanned by ``basis``'s columns."""
    return basis.transpose(0, 1) @ grad


def project_back(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``S N``: the full-size matrix whose subspace coordinates are ``coeffs``."""
    return basis @ coeffs
