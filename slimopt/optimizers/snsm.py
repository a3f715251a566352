"""SN-SM (Nguyen & Nguyen, arXiv 2411.07120): Subspace-Momentum with Subset-Norm step sizes."""
from __future__ import annotations

import torch

from .bases import TopSVD
from .core import SubspaceOptimizer
from .core.subset_norm import (accumulate_, step_scale, subset_normalize, subset_sq_norms)
from .core.subspace_momentum import subspace_momentum_direction_


class SNSM(SubspaceOptimizer):
    """AdamSNSM: momentum in a top-r singular subspace (refreshed every ``update_interval``
    steps, reset at each refresh), plain SGD on its complement, and one adaptive step size per
    index of the larger side of each matrix (subset-norm)::

        m <- beta1 m + (1 - beta1) S^T g            (r x k, reset to 0 when S changes)
        v <- beta2 v + (1 - beta2) sum_i g_i:^2     (k numbers; beta2 = 1: a plain sum)
        W <- (1 - lr wd) W - lr c_t (S m + g - S S^T g) / (sqrt(v) + eps)

    with ``c_t = sqrt(1 - beta2^t) / (1 - beta1^t)`` (the authors' bias correction, applied to the
    whole step). State per matrix: ``r x max(m, n)`` momentum, ``min(m, n) x r`` basis and
    ``max(m, n)`` accumulators. Non-2-D parameters and dense groups get AdamW.

    The paper applies it to every ``nn.Linear`` weight including lm_head
    (``slimopt.param_groups(model, rank=..., include_head=True)``) with a learning rate about 10x
    Adam's and ``weight_decay=0``. Differences from the authors' code: the momentum is reset
    cleanly at a refresh (their code applies the new basis to the old momentum for one step and
    drops that step's gradient from the restarted momentum); weight decay is applied before the
    update, not after.
    """

    argument_docs = {
        "betas": "(beta1, beta2): the subspace momentum's decay rate in [0, 1) and the subset-norm "
                 "accumulators' in [0, 1] (1: a plain sum, AdaGrad-style)",
        "moment_rule": "what the momentum does when the basis changes: 'reset' (the paper's), "
                       "'keep' or 'transport'",
        "subset_norm": "True: subset-norm step sizes; False: Subspace-Momentum with plain SGD "
                       "steps (no step sizes, no bias correction)",
    }
    beta2_may_be_one = True
    moment_names = ("exp_avg", None)

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-6, weight_decay=0.0, *, moment_rule="reset", subset_norm=True,
                 svd="exact", stagger_refresh=False, seed=0, maximize=False, nonfinite="skip",
                 state_dtype="float32"):
        super().__init__(params, locals())

    @staticmethod
    def policy_from_group(group):
        return TopSVD(group["svd"])

    def check_group(self, group):
        if not isinstance(group["subset_norm"], bool):
            raise ValueError(f"subset_norm must be True or False, got {group['subset_norm']!r}")
        super().check_group(group)

    def _init_inner_state(self, p, group, state, d, k, r):
        state["exp_avg"] = torch.zeros(r, k, dtype=p.dtype, device=p.device)
        if group["subset_norm"]:
            state["subset_acc"] = torch.zeros(1, k, dtype=p.dtype, device=p.device)

    def _inner_update(self, p, group, state, grad, basis):
        beta1, beta2 = group["betas"]
        direction = subspace_momentum_direction_(basis, grad, state["exp_avg"], beta1)
        state["step"] += 1
        if not group["subset_norm"]:
            return direction
        accumulate_(state["subset_acc"], subset_sq_norms(grad, "matrix"), beta2)
        return subset_normalize(direction, state["subset_acc"], "matrix", group["eps"]).mul_(
            step_scale(state["step"], beta1, beta2))


class SubspaceMomentum(SNSM):
    """Subspace-Momentum alone: EMA momentum in a top-r singular subspace (reset at each
    refresh), plain SGD on the orthogonal complement, ``W <- W - lr (S m + g - S S^T g)``.
    With ``rank`` at the full smaller side it is EMA-momentum SGD (``betas[1]`` and ``eps`` serve
    only the AdamW of dense parameters)."""

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-6, weight_decay=0.0, *, moment_rule="reset", subset_norm=False,
                 svd="exact", stagger_refresh=False, seed=0, maximize=False, nonfinite="skip",
                 state_dtype="float32"):
        super().__init__(params, lr, rank, update_interval, betas, eps, weight_decay,
                         moment_rule=moment_rule, subset_norm=subset_norm, svd=svd,
                         stagger_refresh=stagger_refresh, seed=seed, maximize=maximize,
                         nonfinite=nonfinite, state_dtype=state_dtype)
