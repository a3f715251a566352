"""What happens to Adam's moments when the subspace basis changes.

Two rules: ``keep`` (GaLore, SARA: the moments are left as they are, so after a change they mix
coordinates of two bases) and ``transport`` (LDAdam's projection-aware rule that SubTrack++,
GrassWalk and GrassJump use): with ``C = S_new^T S_old`` (r x r),

    M <- C M
    V <- | (C o C)(V - M o M) + (C M) o (C M) |

where ``o`` is the element-wise product and the ``M`` inside is the old first moment. ``V - M o M``
is the per-coordinate variance estimate; it is carried across with ``C o C`` (exact for
independent coordinates) and the squared transported mean is added back.
"""
from __future__ import annotations

import torch


def transport_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      basis_old: torch.Tensor, basis_new: torch.Tensor):
    """Return ``(M', V')``, the moments expressed in ``basis_new`` (pure; inputs untouched).

    Bases are ``d x r`` with orthonormal columns; moments are ``r x k``.
    """
    change = basis_new.transpose(0, 1) @ basis_old
    new_avg = change @ exp_avg
    variance = exp_avg_sq - exp_avg * exp_avg
    new_avg_sq = ((change * change) @ variance).add_(new_avg * new_avg).abs_()
    return new_avg, new_avg_sq


MOMENT_RULES = ("keep", "transport")
