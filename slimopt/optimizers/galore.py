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

    @staticmethod
    def policy_from_group(group):
        return TopSVD()
