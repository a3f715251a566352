"""SARA's policy: singular directions drawn at random with probability proportional to sigma.

At each change take the SVD ``G = U Sigma V^T`` and draw ``r`` distinct indices without replacement,
successively, with weights ``sigma_i / sum(sigma)`` (not squared): the law of
``torch.multinomial(sigma, r, replacement=False)``, drawn as Efraimidis and Spirakis's exponential
race (the ``r`` largest ``log(u_i) / sigma_i`` for portable uniforms ``u_i``, the same on every
device). The drawn columns are kept in index order
(descending singular value), so coordinate ``i`` of the moments keeps meaning "the i-th strongest
drawn direction" across changes. Directions with a zero singular value are drawn only when fewer
than ``r`` non-zero ones exist (then uniformly among them).
"""
from __future__ import annotations

import torch

from .base import BasisPolicy, left_singular


def sample_singular_indices(sigma: torch.Tensor, rank: int, gen) -> torch.Tensor:
    """``rank`` distinct indices drawn successively with weights proportional to ``sigma``, sorted."""
    weights = sigma.clamp_min(0.0).to(torch.float64)
    positive = int((weights > 0).sum())
    if positive < rank:
        # not enough mass to draw r distinct directions: the zero ones come after, uniformly
        floor = weights.sum() * 1e-12 if positive > 0 else torch.ones((), dtype=weights.dtype)
        weights = torch.where(weights > 0, weights, floor.to(weights))
    race = torch.log(gen.uniform(weights.numel(), weights.device)) / weights
    picked = torch.topk(race, rank).indices
    return torch.sort(picked).values


class ImportanceSVD(BasisPolicy):
    random = True

    def next(self, basis, grad, rank, gen):
        u, sigma = left_singular(grad)
        return u[:, sample_singular_indices(sigma, rank, gen)].contiguous()
