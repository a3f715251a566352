"""Subset-Norm (Nguyen & Nguyen, arXiv 2411.07120) step sizes on a full-size numerator."""
from __future__ import annotations

import torch

from .core import SlimOptimizer
from .core.adam import decoupled_weight_decay_
from .core.subset_norm import (accumulate_, accumulator_shape, default_layout, step_scale,
                               subset_normalize, subset_sq_norms)
from .core.validation import check_int


class SubsetNorm(SlimOptimizer):
    """AdamSN: Adam's EMA momentum (``betas[0] = 0``: plain SGD) with one adaptive step size per
    subset of coordinates instead of per coordinate::

        m <- beta1 m + (1 - beta1) g                    (none when beta1 = 0)
        v_s <- beta2 v_s + (1 - beta2) ||g_s||^2       (beta2 = 1: a plain sum, AdaGrad-style)
        W <- (1 - lr wd) W - lr c_t m / (sqrt(v_s) + eps)

    ``subset_size="auto"``: for a matrix one subset per index of its larger side (``max(m, n)``
    numbers); for other tensors contiguous chunks of about ``sqrt(numel)/2`` elements. An int
    gives chunks of that size (the closest divisor of ``numel`` at or below it): 1 is
    AdaGrad/Adam per coordinate, ``numel`` one subset per tensor (AdaGrad-Norm).
    Groups with ``dense=True`` get AdamW (``slimopt.param_groups`` puts embeddings, head, norms
    and biases there).
    """

    argument_docs = {
        "betas": "(beta1, beta2): the momentum's decay rate in [0, 1) (0: none, plain SGD) and the "
                 "accumulators' in [0, 1] (1: a plain sum, AdaGrad-style)",
        "subset_size": "'auto' or an int >= 1, the chunk size (the closest divisor of numel at or "
                       "below it; see above)",
    }
    beta2_may_be_one = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 subset_size="auto", maximize=False, nonfinite="skip", state_dtype="float32"):
        super().__init__(params, locals())

    def check_group(self, group):
        if group["subset_size"] != "auto":
            check_int("subset_size", group["subset_size"], 1)

    def takes_matrix_rule(self, param, group):
        return not group["dense"]

    def _layout(self, p, group):
        return default_layout(tuple(p.shape), group["subset_size"])

    def _view(self, t, layout, p):
        if layout == "matrix" and p.shape[0] > p.shape[1]:
            return t.transpose(0, 1)
        return t

    def _init_matrix_state(self, p, group, state):
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        shape = accumulator_shape(tuple(p.shape), self._layout(p, group))
        state["subset_acc"] = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def _matrix_step(self, p, group, state):
        beta1, beta2 = group["betas"]
        layout = self._layout(p, group)
        grad = p.grad
        numerator = grad
        if beta1 > 0:
            # a float32 work tensor for a half-precision parameter's low-precision state
            state["exp_avg"].lerp_(grad.to(state["exp_avg"].dtype), 1.0 - beta1)
            numerator = state["exp_avg"]
        state["step"] += 1
        accumulate_(state["subset_acc"], subset_sq_norms(self._view(grad, layout, p), layout),
                    beta2)
        update = subset_normalize(self._view(numerator, layout, p), state["subset_acc"], layout,
                                  group["eps"])
        decoupled_weight_decay_(p, group["lr"], group["weight_decay"])
        p.add_(self._view(update, layout, p),
               alpha=-group["lr"] * step_scale(state["step"], beta1, beta2))
