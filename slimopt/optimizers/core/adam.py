"""The Adam rule as pure tensor functions, shared by the dense and the subspace paths.

The bias-corrected direction follows ``torch.optim.AdamW`` exactly (eps is added to the
bias-corrected ``sqrt(v)``), so that the dense fallback of every slimopt optimizer is AdamW.
galore-torch puts eps on the uncorrected ``sqrt(v)`` instead; the two agree once
``1 - beta2**t`` is near 1.
"""
from __future__ import annotations

import torch


def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                  beta1: float, beta2: float) -> None:
    """In place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2`` (``v <- v + g^2`` when
    ``b2 = 1``, AdaGrad's sum, which optimizers allowing ``b2 = 1`` use)."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    if beta2 >= 1.0:
        exp_avg_sq.addcmul_(grad, grad)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` (a new tensor).

    ``step`` counts the updates already folded into the moments (1 after the first).
    """
    bias_correction1, bias_correction2 = bias_corrections(step, beta1, beta2)
    bias_correction2_sqrt = bias_correction2 ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / bias_correction1).div_(denom)


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """``(1 - beta1^t, 1 - beta2^t)`` after ``step`` updates (1.0 where there is nothing to correct:
    before the first update, or ``beta2 = 1``, AdaGrad's sum)."""
    if step <= 0:
        return 1.0, 1.0
    return 1.0 - beta1 ** step, (1.0 - beta2 ** step) if beta2 < 1.0 else 1.0


def decoupled_weight_decay_(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """AdamW's decoupled decay, applied before the update as torch does."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
