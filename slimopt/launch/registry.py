"""slimopt's optimizers by name, and building one for a model with the GaLore parameter split."""
from __future__ import annotations

import torch

from ..optimizers import GaLore, GrassJump, GrassWalk, SARA
from ..param_groups import param_groups

OPTIMIZERS = {"grasswalk": GrassWalk, "grassjump": GrassJump, "sara": SARA, "galore": GaLore}


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, rank: int | None = 128,
                    **options) -> torch.optim.Optimizer:
    """``name`` is ``"adamw"`` (torch's) or a key of ``OPTIMIZERS`` (case-insensitive); slimopt
    optimizers get ``param_groups(model, rank)``: low-rank projections, dense everything else."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **options)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {['adamw', *OPTIMIZERS]}")
    return OPTIMIZERS[key](param_groups(model, rank=rank), lr=lr, **options)
