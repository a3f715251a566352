"""``SlimOptimizer``: what every slimopt optimizer shares, whatever its matrix rule.

- hyperparameter validation at construction and for every added group (clear ``ValueError``s);
- a stable integer key per parameter (for counter-based randomness, see ``rng``);
- the **dense AdamW fallback**: parameters the matrix rule does not take (not 2-D, or in a group
  with ``dense=True``) get AdamW from the shared Adam functions, so each optimizer is a one-line
  replacement for AdamW;
- the **non-finite gradient policy**: with ``nonfinite="skip"`` (default) a parameter whose
  gradient holds NaN or Inf is left untouched for that step (weights, state, step count) and
  ``state["nonfinite_skips"]`` counts it; ``"raise"`` raises ``FloatingPointError``; ``"off"``
  skips the check (it costs one device sync per parameter);
- lazy state creation, or all at once with ``init_state()`` (also on the meta device).

A subclass implements ``takes_matrix_rule``, ``_init_matrix_state`` and ``_matrix_step``.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .adam import adam_direction, adam_moments_, decoupled_weight_decay_
from .validation import (check_adam_group, check_choice, check_gradient, check_int,
                         check_parameter)

NONFINITE_MODES = ("skip", "raise", "off")


class SlimOptimizer(Optimizer):
    #: the method's options and their defaults; a subclass overrides or extends this dict
    option_defaults: dict = {}
    #: whether betas[1] = 1 is allowed (AdaGrad-style sums; the dense AdamW path then skips
    #: its second-moment bias correction, which would be 0)
    beta2_may_be_one: bool = False

    def __init__(self, params, defaults: dict, *, seed=0, nonfinite="skip", options=None):
        options = options or {}
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; "
                            f"its options are {sorted(self.option_defaults)}")
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        check_int("seed", seed, 0)
        self._param_keys: dict[torch.Tensor, int] = {}
        self._zero_bridge = None
        #: set by slimopt.launch.initialize while DeepSpeed may take its zero-gradient first step
        self.skip_zero_first_step = False
        self.nonfinite = nonfinite
        self.seed = int(seed)
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        super().__init__(params, {**defaults, "dense": False,
                                  **self.option_defaults, **options})

    # ------------------------------------------------------------------ subclass hooks
    def check_group(self, group: dict) -> None:
        """Validate the method's own hyperparameters of ``group``."""

    def takes_matrix_rule(self, param: torch.Tensor, group: dict) -> bool:
        raise NotImplementedError

    def _init_matrix_state(self, param: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _matrix_step(self, param: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_group(group, self.beta2_may_be_one)
        if not isinstance(group["dense"], bool):
            raise ValueError(f"dense must be True or False, got {group['dense']!r}")
        self.check_group(group)
        for p in group["params"]:
            check_parameter(p)
            self._param_keys.setdefault(p, len(self._param_keys))

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        state["step"] = 0
        state["nonfinite_skips"] = 0
        state["key"] = self._param_keys[p]
        if self.takes_matrix_rule(p, group):
            self._init_matrix_state(p, group, state)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state now (it is otherwise created at its first step).

        Works on the meta device, which is how ``benchmarks/memory.py`` counts state bytes for
        models that do not fit in memory.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    # ------------------------------------------------------------------ step
    def _finite_flags(self, params) -> dict:
        """Whether each parameter's gradient is finite, computed for all of ``params`` together:
        one fused norm per gradient and a single host sync, not one per parameter (a gradient
        whose float32 norm overflows, entries beyond ~1e19, counts as non-finite too)."""
        if self.nonfinite == "off":
            return {}
        grads = [p for p in params if p.grad is not None and not p.grad.is_meta
                 and p.grad.layout == torch.strided and not p.grad.is_complex()]
        if not grads:
            return {}
        norms = torch._foreach_norm([p.grad for p in grads])
        flags = torch.stack([n.float() for n in norms]).isfinite().tolist()
        return dict(zip(grads, flags))

    def _grad_is_finite(self, grad: torch.Tensor, state: dict, shape, finite=None) -> bool:
        """``finite``: the flag from ``_finite_flags`` if computed, else it is computed here."""
        if finite is None:
            finite = self.nonfinite == "off" or grad.is_meta or bool(torch.isfinite(grad).all())
        if self.nonfinite == "off" or finite:
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
        if self.skip_zero_first_step and not self.state and self._all_grads_zero():
            return loss  # DeepSpeed's step inside initialize (ZeRO-0 + bf16): not a real step
        for group in self.param_groups:
            if self._zero_bridge is not None and "zero_index" in group:
                self._zero_bridge.step_group(self, group)
            else:
                self._step_group(group)
        return loss

    def _all_grads_zero(self) -> bool:
        return all(p.grad is None or not bool(p.grad.any())
                   for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------ DeepSpeed ZeRO
    def attach_zero_bridge(self, bridge) -> None:
        """Route steps of DeepSpeed's flat partitions through ``bridge`` (see
        ``slimopt.launch.zero``); ``slimopt.launch.initialize`` does this."""
        self._zero_bridge = bridge

    def state_dict(self):
        if self._zero_bridge is not None:
            return self._zero_bridge.state_dict(self)
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self._zero_bridge is not None:
            return self._zero_bridge.load_state_dict(self, state_dict)
        return super().load_state_dict(state_dict)

    def _step_group(self, group: dict) -> None:
        """One step for every parameter of ``group`` (a subclass may treat a group as a unit)."""
        finite = self._finite_flags(group["params"])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p not in self._param_keys:
                raise RuntimeError(
                    f"{type(self).__name__} was handed a tensor of shape {tuple(p.shape)} that is "
                    "not one of its parameters: DeepSpeed ZeRO replaces the parameters by flat "
                    "shards, which would silently turn matrix rules into vector rules. Create "
                    "the engine with slimopt.launch.initialize instead of deepspeed.initialize.")
            check_gradient(p.grad, p.shape)
            state = self._init_state(p, group)
            if not self._grad_is_finite(p.grad, state, p.shape, finite.get(p, True)):
                continue
            if self.takes_matrix_rule(p, group):
                self._matrix_step(p, group, state)
            else:
                self._dense_step(p, group, state)

    @staticmethod
    def _dense_step(p, group, state):
        """AdamW, exactly as ``torch.optim.AdamW`` up to float rounding."""
        beta1, beta2 = group["betas"]
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], p.grad, beta1, beta2)
        state["step"] += 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"],
                                   beta1, beta2, group["eps"])
        decoupled_weight_decay_(p, group["lr"], group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    # ------------------------------------------------------------------ diagnostics
    def nonfinite_skips(self) -> int:
        """Parameter updates skipped so far because their gradient held NaN or Inf."""
        return sum(s.get("nonfinite_skips", 0) for s in self.state.values())
