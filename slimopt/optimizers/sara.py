"""SARA (arXiv 2502.05790): importance-sampled singular subspaces for low-rank optimization."""
from __future__ import annotations

from .bases import ImportanceSVD
from .core import SubspaceAdam


class SARA(SubspaceAdam):
    """GaLore-Adam whose basis at each refresh is ``rank`` singular directions of the gradient
    drawn without replacement with probability proportional to their singular values.

    The host optimizer is GaLore-Adam (moments kept, no recovery), as in the paper's main
    experiments; ``recovery=True`` gives the Fira-Adam host the paper reports as its best
    combination, and ``moment_rule="transport"`` (not in the paper) transports the moments.
    """

    @staticmethod
    def policy_from_group(group):
        return ImportanceSVD()
