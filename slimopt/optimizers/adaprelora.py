"""AdaPreLoRA (arXiv 2605.08734): Adafactor-preconditioned LoRA factor updates."""
from __future__ import annotations

import torch
from torch import nn

from .core import SlimOptimizer
from .core.adam import decoupled_weight_decay_
from .core.lora_preconditioner import (adafactor_statistics_, adafactor_weights, factor_update,
                                       reachable_gradient, step_rms)
from .core.validation import check_nonnegative, check_positive, is_finite_real


class AdaPreLoRA(SlimOptimizer):
    """Adafactor-preconditioned updates for LoRA pairs ``W = W0 + s B A``; AdamW for the rest.

    ``AdaPreLoRA(model, lr=...)`` finds the pairs itself (peft's LoRA layers or
    ``slimopt.lora.apply_lora``'s); ``AdaPreLoRA(slimopt.lora.lora_param_groups(model))`` is the
    same with the groups visible. A pair group is ``{"params": [A, B], "lora_scale": s}``.

    Per pair and step (formulas in ``core/lora_preconditioner.py``):

    1. Adafactor's row/column statistics ``R`` (m) and ``C`` (n), as ``torch.optim.Adafactor``
       keeps them (``beta2_t = 1 - t^-0.8``), fed with the part of ``G`` the pair can see, its
       projection onto ``{B X + Y A}`` rebuilt from the factor gradients (``statistics=
       "reachable"``). Our choice: with ``W0`` frozen autograd never forms ``G``.
    2. The closed-form factor step ``(dA, dB)`` whose W-space step ``s (B dA + dB A)`` is the
       H-weighted projection of Adafactor's direction, split evenly between the factors; ``B^T P B``
       and ``A Q A^T`` damped by ``damping * (trace / r)`` (peft starts from ``B = 0``).
       With momentum (``beta1 > 0``, the default ``momentum_on="gradients"``) the solve takes the
       bias-corrected EMAs ``mA``, ``mB`` of the factor gradients in place of ``g_A``, ``g_B``,
       with the current factors: "two-sided whitening on momentum" (our reading of the paper).
       The statistics of step 1 are fed the raw current gradients.
    3. Adafactor's update clipping: the step is scaled down to W-space RMS ``clip_threshold``
       (``None``: off).
    4. Decoupled weight decay on the factors; ``A -= lr dA``, ``B -= lr dB``.

    ``momentum_on="steps"`` keeps the earlier placement (the EMA taken of the clipped solved
    steps ``dA``, ``dB`` instead of the gradients, then ``X -= lr mX``): worse in our fine-tuning
    benchmark, since while ``B ~ 0`` the solved A steps are O(||A||) at any lr and the EMA replays
    them. It is what a checkpoint saved without this option meant, and such a checkpoint loads
    with it. ``beta1=0``: no momentum and no state for it (both placements are then the same).

    State per pair: ``m + n`` statistics, plus ``(m + n) r`` momentum when ``beta1 > 0`` (either
    placement).
    ``lr`` also serves the AdamW group; ``betas``/``eps`` are AdamW's.

    ``lora_scale`` is ``s``: read from the model's LoRA layers when a model is given (an explicit
    ``lora_scale`` is then refused, it would contradict the model); with groups, a group's own
    ``lora_scale`` wins and the option is the default for groups without one.
    A pair is stepped as a unit: both factors need a gradient, or neither (then it is skipped,
    as torch skips a parameter without one); a pair where only one factor has a gradient raises
    ``ValueError`` before anything is updated, and so does ``damping=0`` with a factor of rank
    below r (checked at each step, one SVD per factor: the undamped solves would be singular).
    Factors in bfloat16 or float16 are stepped in float32 (``torch.linalg.solve`` takes neither)
    and keep their pair state in float32; the dense AdamW group refuses float16 parameters as
    every slimopt optimizer does.
    """

    argument_docs = {
        "lr": "learning rate of the pairs and of the AdamW group, a finite number >= 0",
        "betas": "(beta1, beta2) of the AdamW that dense parameters get, each in [0, 1)",
        "eps": "the AdamW's eps, a finite number >= 1.175e-38 (the smallest normal float32)",
        "beta1": "momentum of the factor gradients (or steps, see momentum_on), in [0, 1) "
                 "(0: none, and no state for it)",
        "momentum_on": "what the bias-corrected momentum averages: 'gradients' (the factor "
                       "gradients, before the solve) or 'steps' (the solved, clipped factor "
                       "steps, the placement before this option existed)",
        "beta2_decay": "Adafactor's statistics decay, beta2_t = 1 - t^beta2_decay; a finite "
                       "number < 0",
        "eps1": "Adafactor's eps added to the squared gradient, a finite number > 0",
        "damping": "damping of B^T P B and A Q A^T, times trace / r, a finite number >= 0 (0 needs "
                   "factors of full rank r)",
        "clip_threshold": "Adafactor's update clipping: the largest W-space RMS of a step, a "
                          "finite number > 0; None: off",
        "statistics": "what feeds the statistics: 'reachable' (the part of G the pair can see)",
        "lora_scale": "s in W = W0 + s B A, a finite number > 0; None: the model's alpha / r when "
                      "given a model (an explicit value is then refused), else 1.0 for a pair "
                      "group without its own",
    }
    optional_state_keys = frozenset({"momentum_steps"})
    MOMENTUM_ON = ("gradients", "steps")
    #: a state saved before ``momentum_on`` existed averaged the solved steps
    added_options = {**SlimOptimizer.added_options, "momentum_on": "steps"}

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, *,
                 beta1=0.9, momentum_on="gradients", beta2_decay=-0.8, eps1=1e-30, damping=1e-6,
                 clip_threshold=1.0, statistics="reachable", lora_scale=None, maximize=False,
                 nonfinite="skip", state_dtype="float32"):
        arguments = dict(locals())
        if lora_scale is not None:
            check_positive("lora_scale", lora_scale)
        if isinstance(params, nn.Module):
            if lora_scale is not None:
                raise ValueError("lora_scale is read from the model's LoRA layers (alpha / r) when "
                                 "AdaPreLoRA is given a model; to override it, pass "
                                 "slimopt.lora.lora_param_groups(model) with the groups' "
                                 "lora_scale changed")
            from ..lora import lora_param_groups
            params = lora_param_groups(params)
        arguments["lora_scale"] = 1.0 if lora_scale is None else lora_scale
        super().__init__(params, arguments)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def is_pair(group: dict) -> bool:
        return not group["dense"]

    def check_group(self, group):
        b1 = group["beta1"]
        if not isinstance(b1, (int, float)) or isinstance(b1, bool) or not 0.0 <= b1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {b1!r}")
        if group["momentum_on"] not in self.MOMENTUM_ON:
            raise ValueError(f"momentum_on must be one of {', '.join(map(repr, self.MOMENTUM_ON))}"
                             f", got {group['momentum_on']!r}")
        if not is_finite_real(group["beta2_decay"]) or group["beta2_decay"] >= 0:
            raise ValueError(f"beta2_decay must be a finite negative number, got "
                             f"{group['beta2_decay']!r}")
        check_positive("eps1", group["eps1"])
        check_nonnegative("damping", group["damping"])
        if group["clip_threshold"] is not None:
            check_positive("clip_threshold", group["clip_threshold"])
        if group["statistics"] != "reachable":
            raise ValueError(f"statistics must be 'reachable', got {group['statistics']!r}")
        check_positive("lora_scale", group["lora_scale"])

    def check_group_params(self, group):
        if not self.is_pair(group):
            return
        group["zero_unit"] = "group"  # under ZeRO the pair is stepped together on one rank
        params = group["params"]
        if len(params) != 2:
            raise ValueError(f"a LoRA pair group holds [A, B], got {len(params)} parameter(s); "
                             "build groups with slimopt.lora.lora_param_groups(model)")
        A, B = params
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LoRA pair: expected A (r x n) and B (m x r) with the same r, got "
                             f"A {tuple(A.shape)} and B {tuple(B.shape)} (rank mismatch or "
                             "mis-shaped factors)")
        if A.numel() == 0 or B.numel() == 0:
            raise ValueError(f"LoRA pair: A {tuple(A.shape)} and B {tuple(B.shape)} have an empty "
                             "side; r, m and n must be >= 1 (give an empty layer's factors a "
                             "dense group, or leave them out)")

    def takes_matrix_rule(self, param, group):
        return self.is_pair(group)

    def takes_float16(self, param, group):
        return self.is_pair(group)  # stepped in float32

    def _init_matrix_state(self, p, group, state):
        A, B = group["params"]
        work = self._work_dtype(p)
        if p is A:
            state["row_var"] = torch.zeros(B.shape[0], dtype=work, device=p.device)
            state["col_var"] = torch.zeros(A.shape[1], dtype=work, device=p.device)
        if group["beta1"] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=work)

    @torch.no_grad()
    def reset_pair(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """After a ReLoRA merge: zero the factor momentum, keep the W-space statistics and the
        step count (the statistics' decay schedule continues)."""
        for p in (A, B):
            state = self.state.get(p, {})
            with self._moments_decoded((p, state)):
                if "exp_avg" in state:
                    state["exp_avg"].zero_()
                    state["momentum_steps"] = 0

    # ------------------------------------------------------------------ step
    def _checked_params(self, group):
        if self.is_pair(group):
            A, B = group["params"]
            if (A.grad is None) != (B.grad is None):
                which = "B" if A.grad is None else "A"
                raise ValueError(
                    f"AdaPreLoRA: only one factor of the LoRA pair A {tuple(A.shape)}, B "
                    f"{tuple(B.shape)} has a gradient ({which}); a pair is stepped as a unit. "
                    "Give both factors requires_grad=True, or neither, or put the factor in the "
                    "dense group")
            if group["damping"] == 0 and A.grad is not None:
                self._check_full_rank(A, B)
        return super()._checked_params(group)

    def _check_full_rank(self, A, B):
        """Undamped solves need ``B^T P B`` and ``A Q A^T`` invertible: factors of rank r."""
        work = self._work_dtype(A)
        ranks = [int(torch.linalg.matrix_rank(x.detach().to(work))) for x in (A, B)]
        if min(ranks) < A.shape[0]:
            raise ValueError(f"AdaPreLoRA: damping=0 (the undamped formulas) needs both factors of "
                             f"full rank r={A.shape[0]}, got rank(A)={ranks[0]} and "
                             f"rank(B)={ranks[1]} (peft starts from B = 0); set damping > 0 "
                             "(the default is 1e-6)")

    def _update_group(self, group, finite):
        if not self.is_pair(group):
            return super()._update_group(group, finite)
        A, B = group["params"]
        if A.grad is None:
            return  # neither factor has a gradient (one alone was refused above)
        state_a, state_b = self._init_state(A, group), self._init_state(B, group)
        if self._skip_nonfinite(state_a, finite.get(A, True)) \
                or self._skip_nonfinite(state_b, finite.get(B, True)):
            return
        with self._moments_decoded((A, state_a), (B, state_b)):
            self._pair_step(group, A, B, state_a, state_b)

    def _pair_step(self, group, A, B, state_a, state_b):
        s, damping = group["lora_scale"], group["damping"]
        state_a["step"] += 1
        state_b["step"] += 1
        t = state_a["step"]
        work = self._work_dtype(A)  # .to() is a no-op for float32/float64 factors
        a, b, grad_a, grad_b = (x.to(work) for x in (A, B, A.grad, B.grad))
        seen = reachable_gradient(a, b, grad_a, grad_b, s, damping)
        adafactor_statistics_(state_a["row_var"], state_a["col_var"], seen, t,
                              group["beta2_decay"])
        p, q = adafactor_weights(state_a["row_var"], state_a["col_var"], group["eps1"])
        on_gradients = group["momentum_on"] == "gradients"
        if on_gradients:  # the solve takes the averaged gradients and the current factors
            grad_a, grad_b = self._momentum(group, ((state_a, grad_a), (state_b, grad_b)))
        d_a, d_b = factor_update(a, b, grad_a, grad_b, p, q, s, damping)
        if group["clip_threshold"] is not None:
            rms = float(step_rms(a, b, d_a, d_b, s))
            if rms > group["clip_threshold"]:
                d_a.mul_(group["clip_threshold"] / rms)
                d_b.mul_(group["clip_threshold"] / rms)
        if not on_gradients:
            d_a, d_b = self._momentum(group, ((state_a, d_a), (state_b, d_b)))
        for param, direction in ((A, d_a), (B, d_b)):  # direction in the work dtype until the add
            decoupled_weight_decay_(param, group["lr"], group["weight_decay"])
            param.add_(direction, alpha=-group["lr"])

    @staticmethod
    def _momentum(group, pairs):
        """Per ``(state, x)``: the bias-corrected EMA of ``x`` (``x`` itself when ``beta1 = 0``)."""
        b1 = group["beta1"]
        if b1 == 0:
            return [x for _, x in pairs]
        out = []
        for state, x in pairs:
            state["momentum_steps"] = state.get("momentum_steps", 0) + 1
            state["exp_avg"].lerp_(x, 1.0 - b1)
            out.append(state["exp_avg"] / (1.0 - b1 ** state["momentum_steps"]))
        return out
