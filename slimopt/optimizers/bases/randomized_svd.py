"""The top-r left singular vectors of a gradient by randomized SVD, and the exact counterpart.

``top_left_singular_vectors`` is Halko, Martinsson and Tropp's randomized SVD ("Finding structure
with randomness: probabilistic algorithms for constructing approximate matrix decompositions",
SIAM Review 53(2), 2011): Algorithm 4.4, the randomized range finder with ``q`` power
iterations, re-orthonormalized by a thin QR after every product with ``G`` or ``G^T``
(the "subspace iteration" form, stable in float32), then Algorithm 5.1, the SVD of the small
projected matrix ``B = Q^T G``. For ``G`` of d x k (d <= k) and a sketch of ``l = rank +
oversample`` columns it costs ``2q + 2`` products of d x k by k x l plus QRs and an SVD of
l-column matrices, against the O(d^2 k) of the exact SVD. Its error shrinks like
``(sigma_{l+1} / sigma_r)^(2q+1)``, so power iterations matter for the slowly decaying spectra
of gradients.

Why not ``torch.svd_lowrank``: it draws its test matrix with ``torch.randn`` on torch's global
generator, so a basis refresh would consume (and shift) the user's random stream, would not be
repeatable after a resume, and would differ between CPU and CUDA. Here the Gaussian comes from
slimopt's counter-based ``rng.Draws`` (``gen.normal``), a pure function of (seed, key, draw).

Both functions take every SVD of a tall matrix (``torch.linalg.svd`` of a wide d x k matrix is
about 2x slower on CPU than of its k x d transpose), and return columns with a fixed sign:
the entry of largest magnitude in each column is positive (the first such entry on a tie), so
the result is a deterministic function of the input and, for the randomized one, of the draw.
"""
from __future__ import annotations

import torch

from .base import fix_signs, left_singular

#: power iterations by default: on LLaMA shapes (benchmarks/results/cpu/rsvd_error.md) q=2
#: captures >= 99.5% of the exact top-r energy for sigma_i ~ i^-0.5 and >= 99.99% for i^-1 and
#: real gradients, where q=0 captures 83-95% and 99.6-99.9%; each q costs two more products.
#: The speed-up (1 thread, q=2) is 2-6x for r=256; for r=512 at d=1024 the sketch of 640 columns
#: is as slow as the exact SVD, so the option pays when rank + oversample is well below d/2.
DEFAULT_POWER_ITERATIONS = 2


def default_oversample(rank: int) -> int:
    """Extra sketch columns beyond ``rank``: ``max(10, rank // 4)``. Halko et al. advise 5-10 for
    a fast decay; gradients decay slowly, and at q=2 a quarter of the rank halves the energy
    missed with 10 (sigma_i ~ i^-0.5: 0.48% against 0.95%) for a few tens of percent more work."""
    return max(10, rank // 4)


def _working(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` in a dtype the LAPACK routines accept (float32/float64 kept, others -> float32)."""
    return grad if grad.dtype in (torch.float32, torch.float64) else grad.float()


def exact_top_left_singular_vectors(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact top-``rank`` left singular vectors of ``grad`` (GaLore's ``TopSVD``), d x rank,
    from one SVD in the tall orientation (``base.left_singular``), signs fixed."""
    return left_singular(_working(grad))[0][:, :rank].to(grad.dtype).contiguous()


def _orth(mat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(mat).Q


def range_finder(grad: torch.Tensor, size: int, gen, power_iterations: int) -> torch.Tensor:
    """An orthonormal d x ``size`` basis ``Q`` approximating the dominant column space of ``grad``
    (d x k): ``Q = orth((G G^T)^q G Omega)`` with ``Omega`` a k x ``size`` Gaussian from ``gen``,
    re-orthonormalized after every product (Halko et al., Algorithm 4.4)."""
    omega = gen.normal(grad.shape[1], size, grad)
    q = _orth(grad @ omega)
    for _ in range(power_iterations):
        q = _orth(grad @ _orth(grad.T @ q))
    return q


def top_left_singular_vectors(grad: torch.Tensor, rank: int, gen, oversample: int | None = None,
                              power_iterations: int = DEFAULT_POWER_ITERATIONS) -> torch.Tensor:
    """Approximate top-``rank`` left singular vectors of ``grad`` (d x k), d x rank with
    orthonormal columns in ``grad``'s dtype, by randomized SVD.

    ``oversample`` defaults to ``default_oversample(rank)``; the sketch ``rank + oversample`` is
    clamped to ``min(d, k)``, and when it covers all ``min(d, k)`` directions the exact SVD is
    taken instead (as cheap, and exact). ``gen`` is an ``rng.Draws``: one ``normal`` draw is made
    (none in the exact case). Signs are fixed as in the module docstring.
    """
    d, k = grad.shape
    if not 0 < rank <= min(d, k):
        raise ValueError(f"rank {rank} is outside 1..{min(d, k)} for a {d} x {k} gradient")
    if power_iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {power_iterations}")
    size = min(rank + (default_oversample(rank) if oversample is None else oversample), d, k)
    if size >= min(d, k):
        return exact_top_left_singular_vectors(grad, rank)
    work = _working(grad)
    q = range_finder(work, size, gen, power_iterations)
    small = left_singular(q.T @ work)[0][:, :rank]  # B = Q^T G is size x k: its SVD via B^T
    return fix_signs(q @ small).to(grad.dtype).contiguous()
