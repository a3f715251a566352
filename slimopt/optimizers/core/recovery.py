"""Fira's recovery scaling of the out-of-subspace gradient, with its norm-growth limiter.

Per column j of the non-projected side, ``phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)`` where ``R``
is the projected gradient and ``N`` the Adam direction computed from it: the factor by which Adam
rescaled that column inside the subspace. The residual is scaled column-wise by the same factor:
``Lambda = phi o residual``. The limiter caps ``||Lambda_t||`` at ``zeta ||Lambda_{t-1}||``
(``zeta = 1.01`` in Fira); one scalar of state per matrix, the previous (post-limit) norm.

The limiter acts **before Adam's bias correction**, as in Fira's and SubTrack's code (and the
spec's ``W <- W - eta_t (alpha S N + Lambda)`` with the bias correction folded into ``eta_t``):
the norm it compares and stores is that of ``Lambda / c_t``, where ``c_t = sqrt(1 - beta2^t) /
(1 - beta1^t)`` is the factor the bias correction puts on the direction. The caller passes the
bias-corrected direction and ``c_t``; the term it gets back is bias-corrected again. Limiting the
corrected term instead (slimopt until 0.1.0) lets the early growth of ``c_t`` through, and the
limiter rarely binds; in Fira's order it ramps the recovery term up over the first steps.
Like Fira, the cap is ``zeta (||Lambda_{t-1}|| + 1e-8)``.

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
                  mode: str, scale: float, limiter: float, correction: float = 1.0):
    """Return ``(Lambda, norm)``: the recovered update (bias-corrected, as ``direction`` is) and
    the post-limit norm of ``Lambda / correction`` (to keep as state).

    ``correction`` is ``c_t``, the bias correction's factor on ``direction`` (1.0: none);
    ``previous_norm`` is ``None`` on the first step, when nothing is limited.
    """
    phi = direction.norm(dim=0) / (projected.norm(dim=0) + 1e-8)
    lam = residual(grad, basis, projected, mode, scale).mul_(phi)
    norm = float(lam.norm()) / correction
    if previous_norm is not None:
        cap = limiter * (previous_norm + 1e-8)
        if norm > cap:
            lam.mul_(cap / norm)
            norm = cap
    return lam, norm
