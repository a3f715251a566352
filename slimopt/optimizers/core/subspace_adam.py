"""``SubspaceAdam``: Adam in the subspace, the inner rule of GaLore, SARA, GrassWalk, GrassJump.

On ``R = S^T G``: ``M, V`` updated as Adam's, ``N = m_hat / (sqrt(v_hat) + eps)``, and the update
``U = scale * S N + Lambda``, where ``Lambda`` is Fira's **recovery** of the out-of-subspace
residual (``recovery.py``; off for GaLore/SARA, on for GrassWalk/GrassJump).
"""
from __future__ import annotations

import torch

from ...kernels import project_adam_moments_, project_back
from .adam import adam_direction, bias_corrections
from .recovery import RESIDUAL_MODES, recovery_term
from .subspace import SubspaceOptimizer
from .validation import check_choice, check_nonnegative, check_positive


class SubspaceAdam(SubspaceOptimizer):
    """Adam with its moments in a low-rank subspace, and dense AdamW for everything else.

    A recipe sets ``policy_from_group`` and lists its hyperparameters in its ``__init__``: ``lr``,
    ``rank``, ``update_interval``, ``betas``, ``eps``, ``weight_decay``, ``scale`` and the options
    ``moment_rule``, ``recovery``, ``residual``, ``limiter``, then ``seed`` and ``nonfinite``
    (meanings in ``hyperparameters.ARGUMENT_DOCS``).
    """

    optional_state_keys = frozenset({"recovery_norm"})

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

    def _moment_corrections(self, group, state) -> tuple[float, float]:
        return bias_corrections(state["step"], *group["betas"])

    def _inner_update(self, p, group, state, grad, basis) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        projected = project_adam_moments_(basis, grad, state["exp_avg"], state["exp_avg_sq"],
                                          beta1, beta2)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"],
                                   beta1, beta2, group["eps"])
        update = project_back(basis, direction).mul_(group["scale"])
        if group["recovery"]:
            bc1, bc2 = bias_corrections(state["step"], beta1, beta2)
            lam, norm = recovery_term(grad, basis, projected, direction,
                                      state.get("recovery_norm"), mode=group["residual"],
                                      scale=group["scale"], limiter=group["limiter"],
                                      correction=bc2 ** 0.5 / bc1)
            update.add_(lam)
            state["recovery_norm"] = norm
        return update
