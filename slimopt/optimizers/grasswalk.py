"""GrassWalk (Rajabi et al., arXiv 2510.01878): a random geodesic walk on the Grassmannian."""
from __future__ import annotations

from .bases import GrassmannWalk
from .core import SubspaceAdam


class GrassWalk(SubspaceAdam):
    """Every ``update_interval`` steps the basis takes a random geodesic step of angle
    ``walk_angle`` (radians; the geodesic distance moved), with the moments transported into the
    new basis and Fira's recovery scaling of the residual.

    ``walk_tangent_rank`` is 1 (one direction turns per move; SubTrack++'s finding) or ``"full"``;
    ``walk_init`` is ``"svd"`` (top-r SVD of the first gradient) or ``"random"``. The paper's value
    of the step size is not public; ``walk_angle=0.5`` is our default (see the README).
    """

    argument_docs = {
        "walk_angle": "the geodesic distance of each move in radians, in (0, pi/2]",
        "walk_tangent_rank": "directions that turn per move: 1 or 'full'",
        "walk_init": "the first basis: 'svd' (top-r SVD of the first gradient) or 'random'",
    }

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, moment_rule="transport", recovery=True,
                 residual="orthogonal", limiter=1.01, walk_angle=0.5, walk_tangent_rank=1,
                 walk_init="svd", svd="exact", stagger_refresh=False, seed=0,
                 maximize=False, nonfinite="skip", compile=False, state_dtype="float32"):
        super().__init__(params, locals())

    @staticmethod
    def policy_from_group(group):
        return GrassmannWalk(group["walk_angle"], group["walk_tangent_rank"], group["walk_init"],
                             group["svd"])
