"""Subset-Norm step sizes (Nguyen & Nguyen, arXiv 2411.07120) as pure functions.

The coordinates are partitioned into subsets; one accumulator per subset keeps the (EMA of the)
squared norm of the gradient on that subset, and every coordinate of the subset steps with
``g_j / (sqrt(acc) + eps)``. ``beta2 = 1`` accumulates a plain sum (AdaGrad-norm per subset);
``beta2 < 1`` an EMA with Adam's bias correction.

Partitions ("layouts"):
- ``"matrix"``: a canonical ``d x k`` matrix (``d <= k``): one subset per index of the larger
  side, summed over the smaller one (``k`` numbers per matrix; the paper's heuristic);
- an int ``c``: contiguous chunks of ``c`` elements of the flattened tensor (``c`` must divide
  ``numel``; ``chunk_size`` picks the closest divisor). ``c = 1`` is AdaGrad/Adam per coordinate,
  ``c = numel`` one subset for the whole tensor (AdaGrad-Norm).
"""
from __future__ import annotations

import math

import torch


def chunk_size(numel: int, target: int) -> int:
    """The largest divisor of ``numel`` that is ``<= target`` (at least 1)."""
    target = max(1, min(int(target), numel))
    for c in range(target, 0, -1):
        if numel % c == 0:
            return c
    return 1


def default_layout(shape, subset_size):
    """``"matrix"`` for 2-D tensors under ``"auto"``, else a chunk size (``sqrt(numel)/2`` for
    ``"auto"``, the closest divisor of ``numel`` at or below an int ``subset_size``)."""
    numel = math.prod(shape)
    if subset_size == "auto":
        if len(shape) == 2:
            return "matrix"
        return chunk_size(numel, int(math.sqrt(numel) / 2))
    return chunk_size(numel, subset_size)


def accumulator_shape(shape, layout):
    if layout == "matrix":
        return (1, max(shape))
    return (math.prod(shape) // layout, 1)


def subset_sq_norms(grad: torch.Tensor, layout) -> torch.Tensor:
    """Squared norm of ``grad`` on each subset, shaped like the accumulator (for broadcasting).
    For ``"matrix"``, ``grad`` is the canonical ``d x k`` view."""
    if layout == "matrix":
        return (grad * grad).sum(dim=0, keepdim=True)
    chunks = grad.reshape(-1, layout)
    return (chunks * chunks).sum(dim=1, keepdim=True)


def accumulate_(acc: torch.Tensor, sq_norms: torch.Tensor, beta2: float) -> None:
    """``acc <- beta2 acc + (1 - beta2) s`` (EMA), or ``acc <- acc + s`` when ``beta2 == 1``."""
    if beta2 >= 1.0:
        acc.add_(sq_norms)
    else:
        acc.mul_(beta2).add_(sq_norms, alpha=1.0 - beta2)


def step_scale(step: int, beta1: float, beta2: float) -> float:
    """Adam's bias correction ``sqrt(1 - beta2^t) / (1 - beta1^t)`` applied to the whole step
    (as the authors' code does); no second-moment correction for ``beta2 = 1``."""
    corr2 = math.sqrt(1.0 - beta2 ** step) if beta2 < 1.0 else 1.0
    return corr2 / (1.0 - beta1 ** step)


def subset_normalize(numerator: torch.Tensor, acc: torch.Tensor, layout, eps: float):
    """``numerator / (sqrt(acc) + eps)`` with the accumulator broadcast over its subsets."""
    denom = acc.sqrt().add_(eps)
    if layout == "matrix":
        return numerator / denom
    return (numerator.reshape(-1, layout) / denom).reshape(numerator.shape)
