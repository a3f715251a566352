"""Pieces shared by every slimopt optimizer: the Adam rule, moment transport, recovery scaling,
counter-based randomness, validation and the projected-Adam core that wires them."""
from .subspace_adam import SubspaceAdam

__all__ = ["SubspaceAdam"]
