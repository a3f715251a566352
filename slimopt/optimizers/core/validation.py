"""Hyperparameter checks: one clear ``ValueError`` per bad value, naming it and the value."""
from __future__ import annotations

import math
import numbers

import torch

#: the smallest eps accepted: the smallest normal float32 (and bfloat16) number, so that an eps
#: added to a zero denominator never rounds to 0 (0 / 0 would turn a zero gradient into NaN)
EPS_MIN = torch.finfo(torch.float32).tiny


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite_real(x) -> bool:
    """A real number (not a bool, not a tensor) that is neither NaN nor infinite."""
    return _is_real(x) and math.isfinite(x)


def check_nonnegative(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_eps(name: str, value) -> None:
    """An eps that keeps ``x / (y + eps)`` finite for ``y = 0`` in float32 and bfloat16."""
    if not _is_real(value) or not math.isfinite(value) or value < EPS_MIN:
        raise ValueError(f"{name} must be a finite number >= {EPS_MIN:.4g} (the smallest normal "
                         f"float32, so that it never rounds to 0), got {value!r}")


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


def check_lr(value) -> None:
    """A finite number >= 0, or a 0-d real floating tensor holding one (torch's recipe for a
    compiled step with a scheduler: ``lr=torch.tensor(1e-3)``)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point() \
                or not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"lr must be a finite number >= 0 or a 0-d real floating tensor "
                             f"holding one, got {value!r}")
        return
    check_nonnegative("lr", value)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_adam_group(group: dict, beta2_may_be_one: bool = False) -> None:
    """The hyperparameters every slimopt Adam-style group shares."""
    check_lr(group["lr"])
    check_bool("maximize", group["maximize"])
    check_betas(group["betas"], beta2_may_be_one)
    check_eps("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])


def check_parameter(param: torch.Tensor) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"optimizer params must be tensors, got {type(param).__name__}")
    if param.is_complex():
        raise ValueError(f"complex parameters are not supported (got a {param.dtype} parameter "
                         f"of shape {tuple(param.shape)}); optimize torch.view_as_real(p) instead")


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters), told
    without importing torch.distributed."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def check_listed_once(params) -> None:
    """Refuse a parameter listed twice in one group (it would be stepped twice per step)."""
    seen = set()
    for p in params:
        tensor = p[1] if isinstance(p, tuple) and len(p) == 2 else p
        if id(tensor) in seen:
            raise ValueError(f"a parameter of shape {tuple(getattr(tensor, 'shape', ()))} is listed "
                             "more than once in a parameter group; list each parameter once")
        seen.add(id(tensor))


def check_gradient(grad: torch.Tensor, shape) -> None:
    if grad.is_sparse:
        raise RuntimeError(f"sparse gradients are not supported (parameter of shape {tuple(shape)});"
                           " use dense gradients, e.g. nn.Embedding(sparse=False)")
