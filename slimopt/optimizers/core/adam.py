"""The Adam rule as pure tensor functions, shared by the dense and the subspace paths.

The bias-corrected direction follows ``torch.optim.AdamW`` exactly (eps is added to the
bias-corrected ``sqrt(v)``), so that the dense fallback of every slimopt optimizer is AdamW.
galore-torch puts eps on the uncorrected ``sqrt(v)`` instead; the two agree once
``1 - beta2**t`` is near 1.
"""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw as fused_adamw  # torch's functional AdamW, used fused=True
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                  beta1: float, beta2: float) -> None:
    """In place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2`` (``v <- v + g^2`` when
    ``b2 = 1``, AdaGrad's sum, which optimizers allowing ``b2 = 1`` use)."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    if beta2 >= 1.0:
        exp_avg_sq.addcmul_(grad, grad)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_moments_many_(exp_avgs: list, exp_avg_sqs: list, grads: list, beta1: float,
                       beta2: float) -> None:
    """``adam_moments_`` for lists of tensors, as ``torch._foreach_*`` operations: a launch per
    operation for the whole list."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    if beta2 < 1.0:
        torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 if beta2 >= 1.0 else 1.0 - beta2)


def adam_directions(exp_avgs: list, exp_avg_sqs: list, bias_correction1, bias_correction2_sqrt,
                    eps: float) -> list:
    """Bias-corrected Adam directions ``m_hat / (sqrt(v_hat) + eps)`` of lists of moments (new
    tensors), as ``torch._foreach_*`` operations: a launch per operation for the whole list.

    ``bias_correction1`` is ``1 - beta1^t`` and ``bias_correction2_sqrt`` is
    ``sqrt(1 - beta2^t)`` (``bias_corrections``), Python floats or 0-d tensors (what a compiled
    caller passes, so that the graph does not change with the step).
    """
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, bias_correction1)
    torch._foreach_div_(directions, denom)
    return directions


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """One AdamW step in place, in ``torch.optim.AdamW``'s single-tensor order (decay, moments,
    then ``param.addcdiv_``); ``step`` counts the updates including this one."""
    decoupled_weight_decay_(param, lr, weight_decay)
    adam_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    bias_correction1, bias_correction2 = bias_corrections(step, beta1, beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adamw_steps_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, step: int, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """``adamw_step_`` for lists of tensors that share a step count: torch's own fused AdamW
    kernel (``torch.optim.adamw.adamw(fused=True)``, one pass over each tensor; about 10x the
    single-tensor path on the CPU) where its device takes it and ``beta2 < 1``, else one
    ``adamw_step_`` per tensor (``beta2 = 1``, AdaGrad's sum, has no bias correction to take)."""
    if beta2 >= 1.0 or params[0].device.type not in _get_fused_kernels_supported_devices():
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            adamw_step_(p, g, m, v, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay)
        return
    # the functional increments each step tensor before its update: hand it step - 1
    steps = [torch.full((), step - 1, dtype=torch.float32, device=p.device) for p in params]
    fused_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True,
          foreach=False, capturable=False, differentiable=False, grad_scale=None,
          found_inf=None, has_complex=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
          weight_decay=weight_decay, eps=eps, maximize=False)


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
