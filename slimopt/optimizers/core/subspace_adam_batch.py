"""One step of Adam in the subspace for a batch of same-shape matrices, as pure functions of
tensor lists. With ``compile=True`` the part before the weights are written
(``subspace_adam_coefficients_``: moments, directions, Fira's column factors) is compiled; the
products stay eager: an in-place update of a weight view is functionalized under
``torch.compile`` into a ``d x k`` copy and write-back per matrix, slower than the eager
``addmm_``, and inductor's product is the same BLAS call.

For each matrix of the batch, in the canonical orientation (``W``, ``G``: ``d x k``; ``S``:
``d x r``; moments ``r x k``)::

    R = S^T G;   M, V <- Adam's moments of R;   N = m_hat / (sqrt(v_hat) + eps)
    W <- (1 - lr wd) W - lr (alpha S X + G o phi)

with ``X = N`` and no ``phi`` term without recovery, and with Fira's recovery ``X = N - (f /
alpha) R o phi`` and the limited column factors ``phi`` of ``recovery.recovery_scales``.

The moments, directions and the column factors are ``torch._foreach_*`` or stacked operations: a
launch per operation for the whole batch. The products with the basis are one per matrix: a
batched ``bmm`` would first copy every gradient into one stacked tensor. The update is added into
the weight in place (``addmm_``, ``addcmul_``): no ``d x k`` update is formed. The step-dependent
scalars (``lr``, the bias corrections) may be Python floats (eager) or 0-d tensors (compiled:
a float would be baked into the graph and recompile it at every step).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...kernels.projection import use_triton
from .adam import adam_directions, adam_moments_many_
from .recovery import recovery_scales


class Recovery(NamedTuple):
    """Fira's recovery: ``factor`` is ``f`` of the residual ``G - f S R``; ``limiter`` is zeta."""
    factor: float
    limiter: float


def subspace_adam_coefficients_(projected: list, grads: list, exp_avgs: list,
                                exp_avg_sqs: list, previous_norms, lr, bias_correction1,
                                bias_correction2_sqrt, *, beta1: float, beta2: float, eps: float,
                                scale: float, recovery: Recovery | None):
    """From the projections ``R = S^T G``: the moments updated in place, and what the weights
    then take. Returns ``(coeffs, phi, norms)`` with ``W -= S coeffs_i`` and, with recovery,
    ``W += G o phi_i``, where ``coeffs`` already hold ``-lr alpha`` and ``phi`` ``-lr``;
    ``norms`` are the limiter's new norms ``(B,)`` (``previous_norms``: ``(B,)``, negative where
    none), None without recovery. Element-wise work and reductions only (the products stay
    outside): what ``compile=True`` compiles, fused by inductor."""
    r = [x.to(m.dtype) for x, m in zip(projected, exp_avgs)]  # a no-op when the dtypes agree
    adam_moments_many_(exp_avgs, exp_avg_sqs, r, beta1, beta2)
    coeffs = adam_directions(exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt, eps)
    norms = phi = None
    if recovery is not None:
        phi, norms = recovery_scales(grads, projected, coeffs, previous_norms,
                                     factor=recovery.factor, limiter=recovery.limiter,
                                     correction=bias_correction2_sqrt / bias_correction1)
        coeffs = [torch.addcmul(n, r.to(n.dtype), f.to(n.dtype), value=-recovery.factor / scale)
                  for n, r, f in zip(coeffs, projected, phi)]
        phi = phi * -lr
    torch._foreach_mul_(coeffs, -lr * scale)
    return coeffs, phi, norms


def project_all(bases: list, grads: list) -> list:
    """``S^T G`` of each matrix of the batch, the backend chosen once for the batch
    (``kernels.dispatch``: Triton on CUDA, torch elsewhere)."""
    if use_triton(bases[0], grads[0]):
        from ...kernels import triton_projection
        return [triton_projection.project(s, g) for s, g in zip(bases, grads)]
    return [s.transpose(0, 1) @ g for s, g in zip(bases, grads)]


def apply_subspace_updates_(weights: list, grads: list, bases: list, coeffs: list, phi, lr, *,
                            weight_decay: float) -> None:
    """``W <- (1 - lr wd) W + S coeffs (+ G o phi)`` in place, for weights as canonical views: a
    product added into each weight (``addmm_``), no ``d x k`` update formed."""
    if weight_decay != 0.0:
        torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
    for i, weight in enumerate(weights):
        weight.addmm_(bases[i], coeffs[i].to(weight.dtype))
        if phi is not None:
            weight.addcmul_(grads[i], phi[i].to(weight.dtype))
