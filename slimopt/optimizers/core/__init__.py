"""Pieces shared by every slimopt optimizer: the Adam rule, moment rules, recovery scaling,
counter-based randomness, validation, the optimizer base with its dense AdamW fallback, and the
subspace frame the low-rank methods are recipes of."""
from .base import SlimOptimizer
from .subspace import SubspaceOptimizer
from .subspace_adam import SubspaceAdam

__all__ = ["SlimOptimizer", "SubspaceOptimizer", "SubspaceAdam"]
