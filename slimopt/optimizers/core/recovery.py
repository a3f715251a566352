"""Fira's recovery scaling of the out-of-subspace gradient, with its norm-growth limiter.

Per column j of the non-projected side, ``phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)`` where ``R``
is the projected gradient and ``N`` the Adam direction computed from it: the factor by which Adam
rescaled that column inside the subspace. The residual is scaled column-wise by the same factor:
``Lambda = phi o residual``. The limiter caps ``||Lambda_t||`` at ``zeta ||Lambda_{t-1}||``
(``zeta = 1.01`` in Fira); one scalar of state per matrix, the previous (post-limit) norm.

The residual comes in two forms: ``"orthogonal"`` is the paper's ``(I - S S^T) G``;
``"scaled"`` is what the public codes compute, ``G - alpha S S^T G``.
"""
from __future__ import annotations

import torch

RESIDUAL_MODES = ("orthogonal", "scaled")


def residual(grad: torch.Tensor, basis: torch.Tensor, projected: torch.Tensor,
             mode: str, scale: float) -> torch.Tensor:
    """Out-of-subspace part of ``grad`` (d x k) for basis ``S`` (d x r), ``projected = S^T grad``."""
    factor = 1.0 if mode == "orthogonal" else scale
    return grad - factor * (basis @ projected)


def recovery_term(grad: torch.Tensor, basis: torch.Tensor, projected: torch.Tensor,
                  direction: torch.Tensor, previous_norm: float | None, *,
                  mode: str, scale: float, limiter: float):
    """Return ``(Lambda, norm)``: the recovered update and its post-limit norm (to keep as state).

    ``previous_norm`` is ``None`` on the first step, when nothing is limited.
    """
    phi = direction.norm(dim=0) / (projected.norm(dim=0) + 1e-8)
    lam = residual(grad, basis, projected, mode, scale).mul_(phi)
    norm = float(lam.norm())
    if previous_norm is not None and previous_norm > 0.0 and norm > limiter * previous_norm:
        cap = limiter * previous_norm
        lam.mul_(cap / norm)
        norm = cap
    return lam, norm
