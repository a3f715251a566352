"""The projected-Adam core that GaLore, SARA, GrassWalk and GrassJump are recipes of.

Per 2-D parameter in a group with an integer ``rank`` below the matrix's smaller side:

1. Work in the canonical orientation: ``G`` (d x k) with ``d <= k`` (the matrix, or its transpose),
   so the basis ``S`` is ``d x r`` and the moments ``r x k`` -- the smaller state, as GaLore does.
2. Every ``update_interval`` steps (and at the first) the **basis policy** gives a new ``S``;
   the **moment rule** keeps the moments or transports them into the new basis.
3. Adam in the subspace on ``R = S^T G``: ``N = m_hat / (sqrt(v_hat) + eps)``.
4. Update ``W <- W - lr * (scale * S N + Lambda)`` where ``Lambda`` is Fira's **recovery** of the
   out-of-subspace residual (off for GaLore/SARA, on for GrassWalk/GrassJump), after AdamW's
   decoupled weight decay ``W <- (1 - lr * wd) W``.

Every other parameter (not 2-D, a group with ``rank=None``, or ``rank >= min(m, n)``) gets dense
AdamW from the same Adam functions, so the optimizer is a one-line replacement for AdamW.

Randomness: draw ``j`` of parameter ``key`` comes from a generator seeded with
``(seed, key, j)`` (``slimopt.optimizers.core.rng``); the state holds only integers for it.

Non-finite gradients: with ``nonfinite="skip"`` (default) a parameter whose gradient holds NaN or
Inf is left untouched for that step (weights, moments, step count and basis), and
``state["nonfinite_skips"]`` counts it; ``nonfinite="raise"`` raises instead. Other parameters
still step. The check costs one device sync per parameter; ``nonfinite="off"`` skips it (as
torch's AdamW does).
"""
from __future__ import annotations

import warnings

import torch
from torch.optim import Optimizer

from ...kernels import project, project_back
from .adam import adam_direction, adam_moments_, decoupled_weight_decay_
from .recovery import RESIDUAL_MODES, recovery_term
from .rng import generator_for
from .transport import MOMENT_RULES, transport_moments
from .validation import (check_adam_group, check_choice, check_gradient, check_int,
                         check_nonnegative, check_parameter, check_positive)

NONFINITE_MODES = ("skip", "raise", "off")


class SubspaceAdam(Optimizer):
    """Base class: Adam with moments in a low-rank subspace, plus a dense AdamW fallback.

    A recipe sets ``policy_from_group`` and, where it differs, ``option_defaults``; see the
    module docstring. Shared arguments: ``lr``, ``rank`` (``None``: dense AdamW for the group),
    ``update_interval`` (steps between basis changes), ``betas``, ``eps``, ``weight_decay``
    (decoupled, as AdamW; default 1e-2 as ``torch.optim.AdamW``), ``scale`` (GaLore's alpha),
    ``seed`` and ``nonfinite``; options: ``moment_rule`` ("keep" or "transport"), ``recovery``
    (Fira's recovery scaling), ``residual`` ("orthogonal": ``(I - S S^T) G``, the paper's; or
    "scaled": ``G - scale S S^T G``, the public codes'), ``limiter`` (Fira's zeta).
    """

    #: recipe options and their defaults; a recipe overrides or extends this dict
    option_defaults = dict(moment_rule="keep", recovery=False, residual="orthogonal", limiter=1.01)

    def __init__(self, params, lr=1e-3, rank=128, update_interval=200, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, scale=0.25, *, seed=0, nonfinite="skip", **options):
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; "
                            f"its options are {sorted(self.option_defaults)}")
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        check_int("seed", seed, 0)
        self._param_keys: dict[torch.Tensor, int] = {}
        self.nonfinite = nonfinite
        self.seed = int(seed)
        defaults = dict(lr=lr, rank=rank, update_interval=update_interval,
                        betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, scale=scale,
                        **{**self.option_defaults, **options})
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ recipe hooks
    @staticmethod
    def policy_from_group(group: dict):
        """The ``BasisPolicy`` for a group's hyperparameters (validates them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_group(group)
        check_int("rank", group["rank"], 1, allow_none=True)
        check_int("update_interval", group["update_interval"], 1)
        check_positive("scale", group["scale"])
        check_choice("moment_rule", group["moment_rule"], MOMENT_RULES)
        check_choice("residual", group["residual"], RESIDUAL_MODES)
        if not isinstance(group["recovery"], bool):
            raise ValueError(f"recovery must be True or False, got {group['recovery']!r}")
        check_nonnegative("limiter", group["limiter"])
        if group["limiter"] < 1.0:
            raise ValueError(f"limiter must be >= 1 (Fira's zeta), got {group['limiter']!r}")
        self.policy_from_group(group)
        dense_shapes = []
        for p in group["params"]:
            check_parameter(p)
            self._param_keys.setdefault(p, len(self._param_keys))
            if p.dim() == 2 and group["rank"] is not None and group["rank"] >= min(p.shape):
                dense_shapes.append(tuple(p.shape))
        if dense_shapes:
            warnings.warn(f"{type(self).__name__}: rank={group['rank']} is at or above the smaller "
                          f"side of {len(dense_shapes)} matrix parameter(s) {dense_shapes[:4]}"
                          f"{'...' if len(dense_shapes) > 4 else ''}; they get dense AdamW",
                          stacklevel=3)

    @staticmethod
    def is_low_rank(param: torch.Tensor, group: dict) -> bool:
        rank = group["rank"]
        return param.dim() == 2 and rank is not None and rank < min(param.shape)

    @staticmethod
    def _canonical(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The ``d x k`` (``d <= k``) view of a parameter-shaped matrix."""
        return t.transpose(0, 1) if param.shape[0] > param.shape[1] else t

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        state["step"] = 0
        state["nonfinite_skips"] = 0
        state["key"] = self._param_keys[p]
        if self.is_low_rank(p, group):
            d, k = sorted(p.shape)
            r = group["rank"]
            state["exp_avg"] = torch.zeros(r, k, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(r, k, dtype=p.dtype, device=p.device)
            if self.policy_from_group(group).stored:
                state["basis"] = torch.zeros(d, r, dtype=p.dtype, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state now (it is otherwise created at the first step).

        Works on the meta device, which is how ``benchmarks/memory.py`` counts state bytes for
        models that do not fit in memory.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    # ------------------------------------------------------------------ bases
    def _generator(self, state: dict, device: torch.device, draw: int) -> torch.Generator:
        return generator_for(device, self.seed, state["key"], draw)

    def _work_dtype(self, p: torch.Tensor) -> torch.dtype:
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32

    def _regenerate(self, policy, state, grad32, rank, interval):
        gen = self._generator(state, grad32.device, interval)
        return policy.initial(grad32, rank, gen) if interval == 0 else \
            policy.next(None, grad32, rank, gen)

    @torch.no_grad()
    def current_basis(self, p: torch.Tensor) -> torch.Tensor | None:
        """The basis ``S`` (``d x r``, canonical orientation) a low-rank parameter used at its last
        step, regenerated if the policy does not store it; ``None`` for dense parameters or before
        the first step."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state.get(p)
        if not state or not self.is_low_rank(p, group) or state["step"] == 0:
            return None
        if "basis" in state:
            return state["basis"]
        policy = self.policy_from_group(group)
        shape = sorted(p.shape)
        dummy = torch.empty(shape, device=p.device, dtype=self._work_dtype(p))
        interval = (state["step"] - 1) // group["update_interval"]
        return self._regenerate(policy, state, dummy, group["rank"], interval).to(p.dtype)

    # ------------------------------------------------------------------ step
    def _grad_is_finite(self, grad: torch.Tensor, state: dict, shape) -> bool:
        if self.nonfinite == "off" or grad.is_meta or bool(torch.isfinite(grad).all()):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient for a parameter "
                                     f"of shape {tuple(shape)} at step {state['step']}")
        state["nonfinite_skips"] += 1
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_gradient(p.grad, p.shape)
                state = self._init_state(p, group)
                if not self._grad_is_finite(p.grad, state, p.shape):
                    continue
                if self.is_low_rank(p, group):
                    self._low_rank_step(p, group, state)
                else:
                    self._dense_step(p, group, state)
        return loss

    @staticmethod
    def _dense_step(p, group, state):
        beta1, beta2 = group["betas"]
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], p.grad, beta1, beta2)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"],
                                   beta1, beta2, group["eps"])
        decoupled_weight_decay_(p, group["lr"], group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    def _low_rank_step(self, p, group, state):
        beta1, beta2 = group["betas"]
        rank, interval_len = group["rank"], group["update_interval"]
        policy = self.policy_from_group(group)
        grad = self._canonical(p.grad, p)
        t = state["step"]
        interval = t // interval_len
        if t % interval_len == 0:
            grad32 = grad.to(self._work_dtype(p))
            if t == 0:
                basis = self._regenerate(policy, state, grad32, rank, 0)
            else:
                old = state["basis"] if policy.stored else \
                    self._regenerate(policy, state, grad32, rank, interval - 1)
                basis = policy.next(old.to(grad32.dtype), grad32, rank,
                                    self._generator(state, grad.device, interval))
                if group["moment_rule"] == "transport":
                    m, v = transport_moments(state["exp_avg"], state["exp_avg_sq"],
                                             old.to(p.dtype), basis.to(p.dtype))
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
            basis = basis.to(p.dtype)
            if policy.stored:
                state["basis"].copy_(basis)
        elif policy.stored:
            basis = state["basis"]
        else:
            basis = self._regenerate(policy, state, grad.to(self._work_dtype(p)), rank,
                                     interval).to(p.dtype)

        projected = project(basis, grad)
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], projected, beta1, beta2)
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
        decoupled_weight_decay_(p, group["lr"], group["weight_decay"])
        p.add_(self._canonical(update, p), alpha=-group["lr"])

    # ------------------------------------------------------------------ diagnostics
    def nonfinite_skips(self) -> int:
        """Parameter updates skipped so far because their gradient held NaN or Inf."""
        return sum(s.get("nonfinite_skips", 0) for s in self.state.values())
