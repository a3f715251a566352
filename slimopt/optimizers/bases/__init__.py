"""Subspace (basis) policies: how an orthonormal basis is chosen and moved.

Each policy works on the canonical gradient ``d x k`` (``d <= k``) in float32 and returns a
``d x r`` basis with orthonormal columns. ``stored`` says whether the basis must be kept in the
optimizer state (``False`` when it is a pure function of the random draw and can be regenerated).
"""
from .base import BasisPolicy
from .jump import RandomJump
from .sampled_svd import ImportanceSVD
from .svd import TopSVD
from .walk import GrassmannWalk

__all__ = ["BasisPolicy", "TopSVD", "ImportanceSVD", "RandomJump", "GrassmannWalk"]
