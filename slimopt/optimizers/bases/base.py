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
    return q.contiguous().mul_(signs)  # LAPACK's Q is column-major: one copy, row-major


def left_singular(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, sigma)`` of the thin SVD of ``grad`` (``d x k``), singular values descending.

    The SVD is always taken of the tall orientation (``grad^T`` when ``d < k``, whose right
    singular vectors are ``grad``'s left ones): LAPACK's and cuSOLVER's drivers take about twice
    as long on a wide ``d x k`` matrix as on its ``k x d`` transpose (1.26 s against 0.59 s for
    1024 x 2736 on one CPU thread), which is why slimopt's refresh was slower than galore-torch's,
    which happens to pass most LLaMA matrices tall. Column signs are fixed so that each column's
    entry of largest magnitude is positive (``svd_flip``): the basis is then a function of the
    gradient alone, not of the driver's arbitrary signs.
    """
    if grad.shape[0] < grad.shape[1]:
        _, sigma, vh = torch.linalg.svd(grad.transpose(0, 1), full_matrices=False)
        u = vh.transpose(0, 1)
    else:
        u, sigma, _ = torch.linalg.svd(grad, full_matrices=False)
    return fix_signs(u), sigma


def fix_signs(u: torch.Tensor) -> torch.Tensor:
    """``u`` with each column's sign flipped so that its entry of largest magnitude is positive."""
    peak = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    return u * torch.where(peak < 0, -1.0, 1.0).to(u.dtype)


def gaussian(rows: int, cols: int, like: torch.Tensor, gen) -> torch.Tensor:
    """A ``rows x cols`` standard Gaussian from the draw ``gen`` (``rng.Draws``), on ``like``'s
    device and in its dtype."""
    return gen.normal(rows, cols, like)
