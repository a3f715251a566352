"""GrassJump (Rajabi et al., arXiv 2510.01878): uniform random jumps on the Grassmannian."""
from __future__ import annotations

from .bases import RandomJump
from .core import SubspaceAdam
from .core.validation import check_bool


class GrassJump(SubspaceAdam):
    """Every ``update_interval`` steps a fresh basis uniform on the Grassmannian, with the moments
    transported into it (projection-aware Adam).

    By default the basis is not stored: it is regenerated from ``(seed, parameter, interval)``
    when needed (a Gaussian draw and a ``d x r`` QR per step, two at a change), so the state per
    matrix is just the two ``r x max(m, n)`` moments and a few numbers. ``store_basis=True`` keeps
    it instead (``min(m, n) x r`` more state per matrix, no draw or QR on a regular step; README,
    "Step time"). The first basis is random as well.

    **Recovery is off by default**, unlike the paper (``recovery=True`` is its setting, Fira's
    recovery scaling of the residual with the limiter). A uniform random subspace holds little of a
    structured gradient, so the rescaled residual outside it dominates the step (about 7x the
    in-subspace step against 2.7x for an SVD basis: ``benchmarks/recovery_share.py``). In our
    convergence suite GrassJump without recovery ends 7-8% lower on both corpora and on a second
    model size, level with its siblings and galore-torch, at their learning rates (README,
    "Convergence").
    """

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, moment_rule="transport", recovery=False,
                 residual="orthogonal", limiter=1.01, store_basis=False, stagger_refresh=False,
                 seed=0, maximize=False, nonfinite="skip", compile=False, state_dtype="float32"):
        super().__init__(params, locals())

    argument_docs = {
        "store_basis": "True: keep the d x r basis in the state (more memory, no Gaussian draw "
                       "and QR per step); False: regenerate it at every step from its seed",
    }
    added_options = {**SubspaceAdam.added_options, "store_basis": False}

    def check_group(self, group):
        check_bool("store_basis", group["store_basis"])
        super().check_group(group)

    @staticmethod
    def policy_from_group(group):
        return RandomJump(stored=group["store_basis"] is True)
