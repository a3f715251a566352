"""GrassWalk's policy: a random geodesic step of fixed length on the Grassmannian.

From basis ``S`` (d x r) draw a tangent ``Delta = (I - S S^T) Z``, normalise it to unit Frobenius
norm, take its thin SVD ``Delta = U Sigma V^T`` and move along the geodesic (the Grassmann
exponential map) by the angle ``eta``:

    S_new = S V cos(eta Sigma) V^T + U sin(eta Sigma) V^T

With ``||Delta||_F = 1`` the principal angles between ``S`` and ``S_new`` are ``eta * sigma_i`` and
the geodesic distance is exactly ``eta`` (for ``eta <= pi/2``), so ``eta`` is an angle and a large
step cannot degenerate into a jump. ``tangent_rank=1`` (the default, what SubTrack++ found best)
draws ``Z = z w^T`` with ``z`` Gaussian in R^d and ``w`` uniform on the unit sphere of R^r: one
direction of the subspace turns by ``eta`` towards a random direction outside it.
``tangent_rank="full"`` uses a Gaussian ``d x r`` Z.

The first basis is the top-r SVD of the first gradient (``init="svd"``, SubTrack++'s start) or a
uniform random one (``init="random"``). The walk depends on its whole history, so the basis is
stored.
"""
from __future__ import annotations

import math

import torch

from .base import BasisPolicy, gaussian, orthonormalize
from .jump import RandomJump
from .svd import TopSVD


def grassmann_exp(basis: torch.Tensor, tangent: torch.Tensor, angle: float) -> torch.Tensor:
    """Exponential map on the Grassmannian at ``basis`` along ``angle * tangent``."""
    u, sigma, vh = torch.linalg.svd(tangent, full_matrices=False)
    v = vh.transpose(0, 1)
    moved = (basis @ v) * torch.cos(angle * sigma) + u * torch.sin(angle * sigma)
    # re-orthonormalise: a no-op in exact arithmetic, keeps float32 drift from accumulating
    return orthonormalize(moved @ vh)


def random_tangent(basis: torch.Tensor, tangent_rank, gen: torch.Generator) -> torch.Tensor:
    """A random unit-Frobenius-norm tangent vector ``(I - S S^T) Z`` at ``basis``."""
    d, r = basis.shape
    if tangent_rank == 1:
        z = gaussian(d, 1, basis, gen)
        w = gaussian(1, r, basis, gen)
        z = z @ (w / w.norm())
    else:
        z = gaussian(d, r, basis, gen)
    tangent = z - basis @ (basis.transpose(0, 1) @ z)
    return tangent / tangent.norm()


class GrassmannWalk(BasisPolicy):
    random = True

    def __init__(self, angle: float = 0.5, tangent_rank=1, init: str = "svd", svd: str = "exact"):
        if not (isinstance(angle, (int, float)) and not isinstance(angle, bool)
                and 0.0 < angle <= math.pi / 2):
            raise ValueError(f"walk_angle must be a number in (0, pi/2], got {angle!r}")
        if tangent_rank not in (1, "full"):
            raise ValueError(f"walk_tangent_rank must be 1 or 'full', got {tangent_rank!r}")
        if init not in ("svd", "random"):
            raise ValueError(f"walk_init must be 'svd' or 'random', got {init!r}")
        self.angle = float(angle)
        self.tangent_rank = tangent_rank
        self.start = TopSVD(svd) if init == "svd" else RandomJump()

    def initial(self, grad, rank, gen):
        return self.start.next(None, grad, rank, gen)

    def next(self, basis, grad, rank, gen):
        basis = basis.to(grad.dtype)
        return grassmann_exp(basis, random_tangent(basis, self.tangent_rank, gen), self.angle)
