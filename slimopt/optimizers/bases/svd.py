"""GaLore's policy: the top-r left singular vectors of the current gradient, exact or by
randomized SVD (``randomized_svd.py``: Halko et al., a Gaussian sketch from the change's draw)."""
from __future__ import annotations

from .base import BasisPolicy
from .randomized_svd import exact_top_left_singular_vectors, top_left_singular_vectors

SVD_MODES = ("exact", "randomized")


class TopSVD(BasisPolicy):
    def __init__(self, svd: str = "exact"):
        if svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {list(SVD_MODES)}, got {svd!r}")
        self.randomized = svd == "randomized"
        #: the randomized SVD draws its sketch (the exact one draws nothing)
        self.random = self.randomized

    def next(self, basis, grad, rank, gen):
        if self.randomized:
            return top_left_singular_vectors(grad, rank, gen)
        return exact_top_left_singular_vectors(grad, rank)
