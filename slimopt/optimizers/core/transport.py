"""What happens to the subspace moments when the basis changes.

Three rules:

- ``keep`` (GaLore, SARA): the moments are left as they are, so after a change they mix
  coordinates of two bases;
- ``reset`` (Subspace-Momentum): the moments are zeroed;
- ``transport`` (LDAdam's projection-aware rule that SubTrack++, GrassWalk and GrassJump use):
  with ``C = S_new^T S_old`` (r x r),

      M <- C M
      V <- | (C o C)(V - M o M) + (C M) o (C M) |

  where ``o`` is the element-wise product and the ``M`` inside is the old first moment.
  ``V - M o M`` is the per-coordinate variance estimate; it is carried across with ``C o C``
  (exact for independent coordinates) and the squared transported mean is added back.

  The formula holds for **bias-corrected** moments (``M / (1 - beta1^t)``, ``V / (1 - beta2^t)``):
  only those are a mean and a second moment of the same gradients. As in LDAdam's code, the
  moments are corrected, transported and un-corrected again (``corrections``); the raw EMAs
  differ by ``1 - beta2^t`` against ``1 - beta1^t``, so transporting them as they are (slimopt
  until 0.1.0) carried a wrong variance across the switches of the first few thousand steps.
"""
from __future__ import annotations

import torch

MOMENT_RULES = ("keep", "reset", "transport")


def transport_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None,
                      basis_old: torch.Tensor, basis_new: torch.Tensor,
                      corrections: tuple[float, float] = (1.0, 1.0)):
    """Return ``(M', V')``, the moments expressed in ``basis_new`` (pure; inputs untouched).

    Bases are ``d x r`` with orthonormal columns; moments are ``r x k``, raw EMAs whose bias
    corrections are ``corrections = (1 - beta1^t, 1 - beta2^t)``; the formula acts on the
    corrected moments and ``(M', V')`` come back raw. ``exp_avg_sq`` may be ``None`` (a rule with
    a first moment only); then ``V'`` is ``None``.
    """
    change = basis_new.transpose(0, 1) @ basis_old
    new_avg = change @ exp_avg
    if exp_avg_sq is None:
        return new_avg, None
    bc1, bc2 = corrections
    mean = exp_avg / bc1
    new_mean = new_avg / bc1
    variance = exp_avg_sq / bc2 - mean * mean
    new_avg_sq = ((change * change) @ variance).add_(new_mean * new_mean).abs_().mul_(bc2)
    return new_avg, new_avg_sq


def apply_moment_rule_(rule: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None,
                       basis_old: torch.Tensor, basis_new: torch.Tensor,
                       corrections: tuple[float, float] = (1.0, 1.0)) -> None:
    """Apply ``rule`` to the moments in place at a change from ``basis_old`` to ``basis_new``
    (``corrections``: the moments' bias corrections, see ``transport_moments``)."""
    if rule == "keep":
        return
    if rule == "reset":
        exp_avg.zero_()
        if exp_avg_sq is not None:
            exp_avg_sq.zero_()
        return
    # half-precision moments are transported in float32: V - M o M cancels, and bfloat16's
    # rounding of it can leave V' ~ 0 under a large M' (a ~1e24 Adam step, then NaN)
    work = exp_avg.dtype if exp_avg.dtype in (torch.float32, torch.float64) else torch.float32
    new_avg, new_avg_sq = transport_moments(
        exp_avg.to(work), exp_avg_sq.to(work) if exp_avg_sq is not None else None,
        basis_old.to(work), basis_new.to(work), corrections)
    exp_avg.copy_(new_avg)
    if exp_avg_sq is not None:
        exp_avg_sq.copy_(new_avg_sq)
