"""GrassJump's policy: a fresh basis uniform on the Grassmannian at every change.

The basis is the Q factor (signs fixed) of a Gaussian ``d x r`` matrix drawn from the change's
generator, so it depends on nothing but the draw: the optimizer regenerates it from
``(seed, parameter key, interval index)`` instead of storing it (``stored = False``).
"""
from __future__ import annotations

from .base import BasisPolicy, gaussian, orthonormalize


class RandomJump(BasisPolicy):
    stored = False
    random = True

    def next(self, basis, grad, rank, gen):
        return orthonormalize(gaussian(grad.shape[0], rank, grad, gen))
