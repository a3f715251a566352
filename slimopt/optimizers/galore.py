"""GaLore (Zhao et al., arXiv 2403.03507): the baseline the other subspace methods modify."""
from __future__ import annotations

from .bases import TopSVD
from .core import SubspaceAdam


class GaLore(SubspaceAdam):
    """Adam in the top-r singular subspace of the gradient, refreshed every ``update_interval``.

    Moments are kept unchanged across a refresh (as in the paper and galore-torch); no recovery of
    the residual. ``GaLore(params, lr=1e-2, rank=128, update_interval=200, scale=0.25)`` follows
    the paper's LLaMA-60M setting. Differences from galore-torch: eps sits on the bias-corrected
    ``sqrt(v)`` (as torch's AdamW), and weight decay is decoupled and applied before the update.
    """

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, moment_rule="keep", recovery=False,
                 residual="orthogonal", limiter=1.01, svd="exact", stagger_refresh=False, seed=0,
                 maximize=False, nonfinite="skip", compile=False, state_dtype="float32"):
        super().__init__(params, locals())

    @staticmethod
    def policy_from_group(group):
        return TopSVD(group["svd"])
