"""slimopt's optimizers by name, and building one for a model with the GaLore parameter split."""
from __future__ import annotations

import torch

from ..optimizers import (ROOT, SARA, SNSM, GaLore, GrassJump, GrassWalk, SubsetNorm,
                          SubspaceMomentum)
from ..param_groups import param_groups

OPTIMIZERS = {"grasswalk": GrassWalk, "grassjump": GrassJump, "sara": SARA,
              "galore-slimopt": GaLore,
              "snsm": SNSM, "subspacemomentum": SubspaceMomentum, "subsetnorm": SubsetNorm,
              "root": ROOT}
#: optimizers whose matrix rule takes a rank
RANKED = {"grasswalk", "grassjump", "sara", "galore-slimopt", "galore", "snsm",
          "subspacemomentum"}
#: the peers: torch's AdamW, torch's Muon (+ AdamW), galore-torch's GaLoreAdamW
PEERS = {"adamw", "muon", "galore"}
KNOWN = set(OPTIMIZERS) | PEERS
#: optimizers whose papers put the output head in the matrix group
HEAD_IN_MATRIX_GROUP = {"snsm", "subspacemomentum", "subsetnorm"}


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, rank: int | None = 128,
                    **options) -> torch.optim.Optimizer:
    """``name`` is a peer (``adamw``, ``muon``: torch's Muon + AdamW, ``galore``: galore-torch) or
    a key of ``OPTIMIZERS`` (case-insensitive); slimopt
    optimizers get ``param_groups(model, rank)``: the projections take the method's matrix rule,
    everything else AdamW. ``rank`` is ignored by the methods that have none (ROOT, SubsetNorm)."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **options)
    if key == "muon":
        from .peers import torch_muon_with_adamw
        return torch_muon_with_adamw(model, lr=lr, **options)
    if key == "galore":
        from .peers import galore_torch
        return galore_torch(model, lr=lr, rank=rank or 128, **options)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(KNOWN)}")
    groups = param_groups(model, rank=rank if key in RANKED else None,
                          include_head=key in HEAD_IN_MATRIX_GROUP)
    return OPTIMIZERS[key](groups, lr=lr, **options)
