"""Hyperparameter checks: one clear ``ValueError`` per bad value, naming it and the value."""
from __future__ import annotations

import math
import numbers

import torch


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_nonnegative(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_betas(betas, beta2_may_be_one: bool = False) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for i, b in enumerate((b1, b2)):
        closed = i == 1 and beta2_may_be_one
        if not _is_real(b) or not (0.0 <= b <= 1.0 if closed else 0.0 <= b < 1.0):
            interval = "[0, 1]" if closed else "[0, 1)"
            raise ValueError(f"betas[{i}] must be in {interval}, got {b!r} (betas={betas!r})")


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_adam_group(group: dict, beta2_may_be_one: bool = False) -> None:
    """The hyperparameters every slimopt Adam-style group shares."""
    check_nonnegative("lr", group["lr"])
    check_betas(group["betas"], beta2_may_be_one)
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])


def check_parameter(param: torch.Tensor) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"optimizer params must be tensors, got {type(param).__name__}")
    if param.is_complex():
        raise ValueError(f"complex parameters are not supported (got a {param.dtype} parameter "
                         f"of shape {tuple(param.shape)}); optimize torch.view_as_real(p) instead")


def check_gradient(grad: torch.Tensor, shape) -> None:
    if grad.is_sparse:
        raise RuntimeError(f"sparse gradients are not supported (parameter of shape {tuple(shape)});"
                           " use dense gradients, e.g. nn.Embedding(sparse=False)")
