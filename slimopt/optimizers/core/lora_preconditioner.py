"""AdaPreLoRA's algebra as pure functions (arXiv 2605.08734; our reading is in the README).

A LoRA layer is ``W = W0 + s B A`` (B: m x r, A: r x n); autograd gives ``g_A = s B^T G`` and
``g_B = s G A^T`` for the W-space gradient ``G``. Adafactor's factored second moment gives
``H(Y) = P Y Q`` with ``P = diag(sqrt(R / mean(R)))``, ``Q = diag(sqrt(C))`` and the target
direction ``T = P^-1 G Q^-1``. The factor update

    dA = (B^T P B)^-1 [ g_A Q^-1 - 1/2 (g_A A^T)(A Q A^T)^-1 A ] / s^2
    dB = [ P^-1 g_B - 1/2 B (B^T P B)^-1 (B^T g_B) ] (A Q A^T)^-1 / s^2

makes the W-space step ``Delta = s (B dA + dB A)`` the H-weighted projection of ``T`` onto the
LoRA-reachable set ``{B X + Y A}``, split half and half where the two factors overlap (the unique
member of the family ``(dB + B K, dA - K A)`` that minimizes ``||B dA - dB A||_H``).
"""
from __future__ import annotations

import torch


def adafactor_statistics_(row_var: torch.Tensor, col_var: torch.Tensor, grad: torch.Tensor,
                          step: int, beta2_decay: float = -0.8) -> None:
    """``torch.optim.Adafactor``'s row/column statistics, in place: with ``w = step^decay``,
    ``R <- lerp(R, mean_j G_ij^2, w)``, ``C <- lerp(C, mean_i G_ij^2, w)`` (``step`` from 1)."""
    weight = float(step) ** beta2_decay
    row_var.lerp_(grad.norm(dim=1).square_().div_(grad.shape[1]), weight)
    col_var.lerp_(grad.norm(dim=0).square_().div_(grad.shape[0]), weight)


def adafactor_weights(row_var: torch.Tensor, col_var: torch.Tensor, eps1: float):
    """``(p, q)`` with ``p q^T = sqrt(R C^T / mean(R))``, Adafactor's RMS estimate, floored at
    ``eps1``. ``q = max(sqrt(C), eps1)`` equals torch's ``sqrt(max(C, eps1^2))`` but cannot
    underflow: Adafactor's ``eps1^2 = 1e-60`` is 0 in float32, which made ``q = 0`` for a zero
    column and ``grad / q`` NaN. The floor is raised to the dtype's smallest normal number when
    ``eps1`` is below it, so it is never 0. When ``mean(R) <= eps1`` (statistics of zeros, or of
    gradients whose squares underflow, |g| < 1e-19 in float32) ``R / mean(R)`` is undefined and
    ``p = 1``: uniform rows, as torch's floored estimate, not ``sqrt(eps1)``, which would make
    ``B^T P B`` ~1e-15 and the factor step ~1e15 times too large."""
    floor = max(float(eps1), torch.finfo(row_var.dtype).tiny)
    mean = row_var.mean()
    p = (row_var / mean.clamp(min=floor)).clamp(min=floor).sqrt()
    p = torch.where(mean > floor, p, torch.ones_like(p))
    q = col_var.sqrt().clamp(min=floor)
    return p, q


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``gram + lambda I`` with ``lambda = damping * (trace / r + 1e-12)`` (0 leaves it as is)."""
    if damping == 0.0:
        return gram
    r = gram.shape[0]
    lam = damping * (torch.diagonal(gram).sum() / r + 1e-12)
    return gram + lam * torch.eye(r, dtype=gram.dtype, device=gram.device)


def factor_update(A, B, grad_A, grad_B, p, q, scale: float, damping: float = 1e-6):
    """``(dA, dB)`` of the module docstring; ``damping`` regularizes ``B^T P B`` and ``A Q A^T``
    (needed when B = 0, as peft initializes it; 0 gives the exact formulas)."""
    bpb = _damped(B.transpose(0, 1) @ (p[:, None] * B), damping)
    aqa = _damped((A * q) @ A.transpose(0, 1), damping)
    gaat = grad_A @ A.transpose(0, 1)
    d_a = torch.linalg.solve(bpb, grad_A / q - 0.5 * gaat @ torch.linalg.solve(aqa, A))
    inner = grad_B / p[:, None] - 0.5 * B @ torch.linalg.solve(bpb, B.transpose(0, 1) @ grad_B)
    d_b = torch.linalg.solve(aqa, inner.transpose(0, 1)).transpose(0, 1)  # aqa is symmetric
    return d_a / scale ** 2, d_b / scale ** 2


def reachable_gradient(A, B, grad_A, grad_B, scale: float, damping: float = 1e-6):
    """The part of ``G`` a LoRA pair can see: its orthogonal projection onto ``{B X + Y A}``,
    ``P_B G + G P_A - P_B G P_A``, from the factor gradients alone (rank <= 2r). Exact ``G`` when
    the factors have full rank; it feeds the Adafactor statistics (the true ``G`` of a frozen
    ``W0`` is never formed by autograd)."""
    btb = _damped(B.transpose(0, 1) @ B, damping)
    aat = _damped(A @ A.transpose(0, 1), damping)
    left = B @ torch.linalg.solve(btb, grad_A)                               # s P_B G
    right_coeff = torch.linalg.solve(aat, A)                                  # (A A^T)^-1 A
    right = grad_B @ right_coeff                                              # s G P_A
    both = B @ torch.linalg.solve(btb, B.transpose(0, 1) @ grad_B) @ right_coeff
    return (left + right - both) / scale


def step_rms(A, B, d_a, d_b, scale: float) -> torch.Tensor:
    """RMS of ``Delta = s (B dA + dB A)`` in O((m + n) r^2), without forming it."""
    bt_b = B.transpose(0, 1) @ B
    a_at = A @ A.transpose(0, 1)
    sq = ((bt_b @ d_a) * d_a).sum() + 2 * ((B.transpose(0, 1) @ d_b) * (d_a @ A.transpose(0, 1))
                                           ).sum() + ((d_b.transpose(0, 1) @ d_b) * a_at).sum()
    return (scale * scale * sq.clamp(min=0) / (B.shape[0] * A.shape[1])).sqrt()
