"""GrassJump's policy: a fresh basis uniform on the Grassmannian at every change.

The basis is the Q factor (signs fixed) of a Gaussian ``d x r`` matrix drawn from the change's
generator, so it depends on nothing but the draw: the optimizer regenerates it from
``(seed, parameter key, interval index)`` instead of storing it (``stored = False``), unless told
to store it (``RandomJump(stored=True)``: the same basis, kept instead of redrawn).
"""
from __future__ import annotations

from .base import BasisPolicy, gaussian, orthonormalize


class RandomJump(BasisPolicy):
    random = True

    def __init__(self, stored: bool = False):
        #: False (GrassJump's default): the basis is regenerated from its draw at every step
        self.stored = stored

    def next(self, basis, grad, rank, gen):
        return orthonormalize(gaussian(grad.shape[0], rank, grad, gen))
