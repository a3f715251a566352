"""``SubspaceAdam``: Adam in the subspace, the inner rule of GaLore, SARA, GrassWalk, GrassJump.

On ``R = S^T G``: ``M, V`` updated as Adam's, ``N = m_hat / (sqrt(v_hat) + eps)``, and the update
``U = scale * S N + Lambda``, where ``Lambda`` is Fira's **recovery** of the out-of-subspace
residual (``recovery.py``; off for GaLore/SARA/GrassJump, on for GrassWalk).

A batch of same-shape matrices steps together: the moments, directions and the recovery's column
factors as ``torch._foreach_*`` or stacked operations (a launch per operation for the batch), the
two products with the basis one per matrix (``S^T G`` fused with the moment update in Triton on
CUDA), and the update added into the weight in place, ``W -= lr (alpha S X + G o phi)``, without
forming ``U``: two products with the basis per matrix, recovery or not, and nothing read back to
the host.
"""
from __future__ import annotations

import torch

from ...kernels import project_adam_moments_many_
from .adam import adam_directions, bias_corrections
from .recovery import RESIDUAL_MODES, recovery_scales, residual_factor
from .subspace import SubspaceOptimizer
from .validation import check_choice, check_nonnegative, check_positive


def _work(p: torch.Tensor) -> torch.dtype:
    """The dtype of the limiter's norms: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class SubspaceAdam(SubspaceOptimizer):
    """Adam with its moments in a low-rank subspace, and dense AdamW for everything else.

    A recipe sets ``policy_from_group`` and lists its hyperparameters in its ``__init__``: ``lr``,
    ``rank``, ``update_interval``, ``betas``, ``eps``, ``weight_decay``, ``scale`` and the options
    ``moment_rule``, ``recovery``, ``residual``, ``limiter``, then ``seed`` and ``nonfinite``
    (meanings in ``hyperparameters.ARGUMENT_DOCS``).
    """

    #: the limiter's previous norm: in a fresh state with recovery on (``-1``: none yet, nothing
    #: to limit), absent from states saved before it was kept
    optional_state_keys = frozenset({"recovery_norm"})
    scalar_state_keys = frozenset({"recovery_norm"})

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
        if group["recovery"]:
            state["recovery_norm"] = torch.full((), -1.0, dtype=_work(p), device=p.device)

    def _moment_corrections(self, group, state) -> tuple[float, float]:
        return bias_corrections(state["step"], *group["betas"])

    def _step_matrices(self, group, batch) -> None:
        beta1, beta2 = group["betas"]
        lr, scale = group["lr"], group["scale"]
        states = [m.state for m in batch]
        avgs = [st["exp_avg"] for st in states]
        projected = project_adam_moments_many_([m.basis for m in batch], [m.grad for m in batch],
                                               avgs, [st["exp_avg_sq"] for st in states],
                                               beta1, beta2)
        step = states[0]["step"] + 1
        for st in states:
            st["step"] = step
        coeffs = adam_directions(avgs, [st["exp_avg_sq"] for st in states], step, beta1, beta2,
                                 group["eps"])
        phi = None
        if group["recovery"]:
            phi, coeffs = self._recover(group, batch, projected, coeffs, step)
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_([m.param for m in batch], 1.0 - lr * group["weight_decay"])
        for i, m in enumerate(batch):
            weight = self._canonical(m.param, m.param)
            weight.addmm_(m.basis, coeffs[i].to(weight.dtype), alpha=-lr * scale)
            if phi is not None:
                weight.addcmul_(m.grad, phi[i], value=-lr)

    def _recover(self, group, batch, projected, directions, step):
        """Fira's limited column factors ``phi`` (``(B, k)``) and the coefficients
        ``X = N - (f / alpha) R o phi`` of the basis in ``alpha S X + G o phi``; stores the
        limiter's norms."""
        states, work, device = [m.state for m in batch], _work(batch[0].param), batch[0].grad.device
        previous = torch.stack([torch.as_tensor(st.get("recovery_norm", -1.0), dtype=work,
                                                device=device) for st in states])
        bc1, bc2 = bias_corrections(step, *group["betas"])
        factor = residual_factor(group["residual"], group["scale"])
        phi, norms = recovery_scales([m.grad for m in batch], projected, directions, previous,
                                     factor=factor, limiter=group["limiter"],
                                     correction=bc2 ** 0.5 / bc1)
        for st, norm in zip(states, norms.unbind(0)):
            st["recovery_norm"] = norm
        coeffs = [torch.addcmul(n, r.to(n.dtype), f.to(n.dtype), value=-factor / group["scale"])
                  for n, r, f in zip(directions, projected, phi)]
        return phi, coeffs
