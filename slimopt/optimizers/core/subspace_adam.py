"""``SubspaceAdam``: Adam in the subspace, the inner rule of GaLore, SARA, GrassWalk, GrassJump.

On ``R = S^T G``: ``M, V`` updated as Adam's, ``N = m_hat / (sqrt(v_hat) + eps)``, and the update
``U = scale * S N + Lambda``, where ``Lambda`` is Fira's **recovery** of the out-of-subspace
residual (``recovery.py``; off for GaLore/SARA/GrassJump, on for GrassWalk).

A batch of same-shape matrices steps together (``subspace_adam_batch``): foreach operations, two
products with the basis per matrix (recovery or not), the update added into the weight in place,
nothing read back to the host; with ``compile=True`` the part before the weights are written is
compiled.
"""
from __future__ import annotations

import torch

from .adam import bias_corrections
from .recovery import RESIDUAL_MODES, residual_factor
from .subspace_adam_batch import (Recovery, apply_subspace_updates_, project_all,
                                  subspace_adam_coefficients_)
from .subspace import SubspaceOptimizer
from .validation import check_choice, check_nonnegative, check_positive


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
            state["recovery_norm"] = torch.full((), -1.0, dtype=self._work_dtype(p),
                                                 device=p.device)

    def _moment_corrections(self, group, state) -> tuple[float, float]:
        return bias_corrections(state["step"], *group["betas"])

    def _step_matrices(self, group, batch) -> None:
        beta1, beta2 = group["betas"]
        states = [m.state for m in batch]
        step = states[0]["step"] + 1
        bc1, bc2 = bias_corrections(step, beta1, beta2)
        scalars = (group["lr"], bc1, bc2 ** 0.5)
        recovery, previous = None, None
        first = batch[0]
        if group["recovery"]:
            recovery = Recovery(residual_factor(group["residual"], group["scale"]),
                                group["limiter"])
            previous = torch.stack([torch.as_tensor(st.get("recovery_norm", -1.0),
                                                    dtype=self._work_dtype(first.param),
                                                    device=first.grad.device) for st in states])
        compute = subspace_adam_coefficients_
        if self.compile:
            compute = self._compiled()
            scalars = tuple(torch.tensor(x, dtype=self._work_dtype(first.param),
                                         device=first.grad.device) for x in scalars)
        grads, bases = [m.grad for m in batch], [m.basis for m in batch]
        coeffs, phi, norms = compute(
            project_all(bases, grads), grads, [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states], previous, *scalars, beta1=beta1, beta2=beta2,
            eps=group["eps"], scale=group["scale"], recovery=recovery)
        apply_subspace_updates_([self._canonical(m.param, m.param) for m in batch], grads, bases,
                                coeffs, phi, group["lr"], weight_decay=group["weight_decay"])
        for i, st in enumerate(states):
            st["step"] = step
            if norms is not None:
                st["recovery_norm"] = norms[i]

    def _compiled(self):
        """``subspace_adam_coefficients_`` compiled (once per optimizer). A graph per batch
        length, dtype and recovery setting; matrix shapes become dynamic after the second one
        (torch's automatic dynamic shapes), so a model's few shapes do not each recompile. Past
        torch's recompile limit (8 per function) torch runs the function eagerly, with its
        warning."""
        compiled = self.__dict__.get("_compiled_kernel")
        if compiled is None:
            compiled = torch.compile(subspace_adam_coefficients_)
            self._compiled_kernel = compiled
        return compiled
