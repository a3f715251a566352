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

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, moment_rule="keep", recovery=False,
                 residual="orthogonal", limiter=1.01, stagger_refresh=False, seed=0, maximize=False,
                 nonfinite="skip", compile=False, state_dtype="float32"):
        super().__init__(params, locals())

    @staticmethod
    def policy_from_group(group):
        return ImportanceSVD()
