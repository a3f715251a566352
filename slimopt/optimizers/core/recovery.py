"""Fira's recovery scaling of the out-of-subspace gradient, with its norm-growth limiter, in the
one-pass form: no residual matrix is formed and nothing is read back to the host.

Per column j of the non-projected side, ``phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)`` where ``R``
is the projected gradient and ``N`` the Adam direction computed from it: the factor by which Adam
rescaled that column inside the subspace. The residual is scaled column-wise by the same factor:
``Lambda = phi o residual``. The limiter caps ``||Lambda_t||`` at ``zeta ||Lambda_{t-1}||``
(``zeta = 1.01`` in Fira); one scalar of state per matrix, the previous (post-limit) norm, kept as
a 0-d tensor on the parameter's device.

The residual comes in two forms: ``"orthogonal"`` is the paper's ``(I - S S^T) G``;
``"scaled"`` is what the public codes compute, ``G - alpha S S^T G``; both are ``G - f S R`` with
``f = 1`` or ``alpha``. So the whole update is one product with the basis::

    alpha S N + Lambda = S (alpha N - f R o phi) + G o phi

and, the columns of ``S`` being orthonormal, ``||G_j - f S R_j||^2 = ||G_j||^2 - (2f - f^2)
||R_j||^2``: the limiter needs only column norms of ``G``, ``R`` and ``N``, never the residual
itself (slimopt until 0.1.0 formed it with a second ``d x k`` product, and read its norm back to
the host at every step). Where ``G`` lies almost wholly in the subspace the difference of squares
loses the residual's norm to rounding (float32: below ~1e-3 of ``||G_j||``); the residual term
is then negligible beside the in-subspace step, and the clamp at 0 keeps it finite.

The limiter acts **before Adam's bias correction**, as in Fira's and SubTrack's code (and the
spec's ``W <- W - eta_t (alpha S N + Lambda)`` with the bias correction folded into ``eta_t``):
the norm it compares and stores is that of ``Lambda / c_t``, where ``c_t = sqrt(1 - beta2^t) /
(1 - beta1^t)`` is the factor the bias correction puts on the direction. Like Fira, the cap is
``zeta (||Lambda_{t-1}|| + 1e-8)``.
"""
from __future__ import annotations

import math

import torch

RESIDUAL_MODES = ("orthogonal", "scaled")


def residual_factor(mode: str, scale: float) -> float:
    """``f`` of the residual ``G - f S R``: 1 for ``"orthogonal"``, ``scale`` for ``"scaled"``."""
    return 1.0 if mode == "orthogonal" else scale


def _column_sq_norms(mats) -> torch.Tensor:
    """``||X[:, j]||^2`` of each matrix, stacked ``(B, k)``, in float32 or float64."""
    return torch.stack([torch.linalg.vector_norm(x, dim=0, dtype=_work(x)).square() for x in mats])


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recovery_scales(grads, projected, directions, previous, *, factor: float, limiter: float,
                    correction: float):
    """Fira's column factors for a batch of same-shape matrices, limited.

    ``grads`` (``d x k``), ``projected`` (``R``, ``r x k``) and ``directions`` (``N``, ``r x k``,
    bias-corrected) are lists of the batch's matrices; ``previous`` is a ``(B,)`` tensor of the
    previous post-limit norms (negative where there is none: nothing limited); ``factor`` is ``f``
    (``residual_factor``); ``correction`` is ``c_t``. Returns ``(phi, norms)``: the limited
    factors ``(B, k)`` in the matrices' dtype and the post-limit norms of ``Lambda / c_t``,
    ``(B,)``, to keep as state. All on the device, no host sync.
    """
    g_sq, r_sq = _column_sq_norms(grads), _column_sq_norms(projected)
    phi = _column_sq_norms(directions).sqrt_().div_(r_sq.sqrt().add_(1e-8))
    residual_sq = g_sq.sub_(r_sq, alpha=2.0 * factor - factor * factor).clamp_min_(0.0)
    norms = (phi * phi).mul_(residual_sq).sum(dim=1).sqrt_().div_(correction)
    previous = previous.to(norms.dtype)
    cap = torch.where(previous < 0, math.inf, previous.add(1e-8).mul_(limiter))
    bound = norms > cap
    phi.mul_(torch.where(bound, cap / norms, 1.0).unsqueeze(1))
    return phi.to(grads[0].dtype), torch.where(bound, cap, norms)
