"""``SubspaceAdam``: Adam in the subspace, the inner rule of GaLore, SARA, GrassWalk, GrassJump.

On ``R = S^T G``: ``M, V`` updated as Adam's, ``N = m_hat / (sqrt(v_hat) + eps)``, and the update
``U = scale * S N + Lambda``, where ``Lambda`` is Fira's **recovery** of the out-of-subspace
residual (``recovery.py``; off for GaLore/SARA, on for GrassWalk/GrassJump).
"""
from __future__ import annotations

import torch

from ...kernels import project_adam_moments_, project_back
from .adam import adam_direction
from .recovery import RESIDUAL_MODES, recovery_term
from .subspace import SubspaceOptimizer
from .validation import check_choice, check_nonnegative, check_positive


class SubspaceAdam(SubspaceOptimizer):
    """Adam with its moments in a low-rank subspace, and dense AdamW for everything else.

    A recipe sets ``policy_from_group`` and, where it differs, ``option_defaults``. Arguments:
    ``lr``, ``rank`` (``None`` in a group: dense AdamW for it), ``update_interval`` (steps between
    basis changes), ``betas``, ``eps``, ``weight_decay`` (decoupled, as AdamW; default 1e-2 as
    ``torch.optim.AdamW``), ``scale`` (GaLore's alpha), ``seed`` and ``nonfinite``; options:
    ``moment_rule`` ("keep", "reset" or "transport"), ``recovery`` (Fira's recovery scaling),
    ``residual`` ("orthogonal": ``(I - S S^T) G``, the paper's; or "scaled":
    ``G - scale S S^T G``, the public codes'), ``limiter`` (Fira's zeta).
    """

    option_defaults = dict(moment_rule="keep", recovery=False, residual="orthogonal", limiter=1.01)
    optional_state_keys = frozenset({"recovery_norm"})

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, seed=0, nonfinite="skip", **options):
        defaults = dict(lr=lr, rank=rank, update_interval=update_interval, betas=betas, eps=eps,
                        weight_decay=weight_decay, scale=scale)
        super().__init__(params, defaults, seed=seed, nonfinite=nonfinite, options=options)

    def check_group(self, group: dict) -> None:
        check_positive("scale", group["scale"])
        check_choice("residual", group["residual"], RESIDUAL_MODES)
        if not isinstance(group["recovery"], bool):
            raise ValueError(f"recovery must be True or False, got {group['recovery']!r}")
        check_nonnegative("limiter", group["limiter"])
        if group["limiter"] < 1.0:
            raise ValueError(f"limiter must be >= 1 (Fira's zeta), got {group['limiter']!r}")
        super().check_group(group)

    def _init_inner_state(self, p, group, state, d, k, r) -> None:
        state["exp_avg"] = torch.zeros(r, k, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(r, k, dtype=p.dtype, device=p.device)

    def _inner_update(self, p, group, state, grad, basis) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        projected = project_adam_moments_(basis, grad, state["exp_avg"], state["exp_avg_sq"],
                                          beta1, beta2)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"],
                                   beta1, beta2, group["eps"])
        update = project_back(basis, direction).mul_(group["scale"])
        if group["recovery"]:
            lam, norm = recovery_term(grad, basis, projected, direction,
                                      state.get("recovery_norm"), mode=group["residual"],
                                      scale=group["scale"], limiter=group["limiter"])
            update.add_(lam)
            state["recovery_norm"] = norm
        return update
