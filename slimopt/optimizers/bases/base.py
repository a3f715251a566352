"""The interface every basis policy implements, and the helpers they share."""
from __future__ import annotations

import torch


class BasisPolicy:
    """How a subspace basis is chosen at the first step and moved at each later change.

    ``initial(grad, rank, gen)`` and ``next(basis, grad, rank, gen)`` return a ``d x rank`` basis
    with orthonormal columns for the canonical gradient ``grad`` (``d x k``, ``d <= k``, float32).
    ``gen`` is the change's ``rng.Draws`` (device- and dtype-independent random numbers); a
    policy that draws nothing ignores it.
    """

    #: whether the basis must be kept in the optimizer state
    stored: bool = True
    #: whether the policy draws from its generator (its bases depend on the parameter's key)
    random: bool = False

    def initial(self, grad: torch.Tensor, rank: int, gen) -> torch.Tensor:
        return self.next(None, grad, rank, gen)

    def next(self, basis, grad: torch.Tensor, rank: int, gen) -> torch.Tensor:
        raise NotImplementedError


def orthonormalize(mat: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR of ``mat`` with the signs fixed so that ``diag(R) > 0``.

    The sign fix makes the result a function of ``mat``'s column space and column order alone
    (and makes Gaussian draws uniform on the Stiefel manifold); an orthonormal input comes back
    unchanged.
    """
    q, r = torch.linalg.qr(mat)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def gaussian(rows: int, cols: int, like: torch.Tensor, gen) -> torch.Tensor:
    """A ``rows x cols`` standard Gaussian from the draw ``gen`` (``rng.Draws``), on ``like``'s
    device and in its dtype."""
    return gen.normal(rows, cols, like)
