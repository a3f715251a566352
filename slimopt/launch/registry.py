"""slimopt's optimizers by name, and building one for a model with the GaLore parameter split."""
from __future__ import annotations

import torch

from ..optimizers import (ROOT, SARA, SNSM, GaLore, GrassJump, GrassWalk, SubsetNorm,
                          SubspaceMomentum)
from ..param_groups import param_groups

OPTIMIZERS = {"grasswalk": GrassWalk, "grassjump": GrassJump, "sara": SARA, "galore": GaLore,
              "snsm": SNSM, "subspacemomentum": SubspaceMomentum, "subsetnorm": SubsetNorm,
              "root": ROOT}
#: optimizers whose matrix rule takes a rank
RANKED = {"grasswalk", "grassjump", "sara", "galore", "snsm", "subspacemomentum"}
#: optimizers whose papers put the output head in the matrix group
HEAD_IN_MATRIX_GROUP = {"snsm", "subspacemomentum", "subsetnorm"}


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, rank: int | None = 128,
                    **options) -> torch.optim.Optimizer:
    """``name`` is ``"adamw"`` (torch's) or a key of ``OPTIMIZERS`` (case-insensitive); slimopt
    optimizers get ``param_groups(model, rank)``: the projections take the method's matrix rule,
    everything else AdamW. ``rank`` is ignored by the methods that have none (ROOT, SubsetNorm)."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **options)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {['adamw', *OPTIMIZERS]}")
    groups = param_groups(model, rank=rank if key in RANKED else None,
                          include_head=key in HEAD_IN_MATRIX_GROUP)
    return OPTIMIZERS[key](groups, lr=lr, **options)
