"""GrassJump (Rajabi et al., arXiv 2510.01878): uniform random jumps on the Grassmannian."""
from __future__ import annotations

from .bases import RandomJump
from .core import SubspaceAdam


class GrassJump(SubspaceAdam):
    """Every ``update_interval`` steps a fresh basis uniform on the Grassmannian, with the moments
    transported into it (projection-aware Adam) and Fira's recovery scaling of the residual.

    The basis is never stored: it is regenerated from ``(seed, parameter, interval)`` when needed
    (a Gaussian draw and a ``d x r`` QR per step, two at a change), so the state per matrix is just
    the two ``r x max(m, n)`` moments and a few numbers. The first basis is random as well.
    """

    option_defaults = {**SubspaceAdam.option_defaults, "moment_rule": "transport",
                       "recovery": True}

    @staticmethod
    def policy_from_group(group):
        return RandomJump()
