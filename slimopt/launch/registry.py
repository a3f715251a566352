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
#: the peers (``slimopt.launch.peers``): torch's AdamW (foreach, fused) and Muon + AdamW,
#: galore-torch, apollo-torch (APOLLO, APOLLO-Mini), fira, torch-optimizer's Adafactor
PEERS = {"adamw", "adamw-fused", "muon", "galore", "apollo", "apollo-mini", "fira", "adafactor"}
#: optimizers whose matrix rule takes a rank (and an update interval)
RANKED = {"grasswalk", "grassjump", "sara", "galore-slimopt", "galore", "snsm",
          "subspacemomentum", "apollo", "apollo-mini", "fira"}
KNOWN = set(OPTIMIZERS) | PEERS
#: optimizers whose papers put the output head in the matrix group
HEAD_IN_MATRIX_GROUP = {"snsm", "subspacemomentum", "subsetnorm"}


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, rank: int | None = 128,
                    **options) -> torch.optim.Optimizer:
    """``name`` is a peer (see ``PEERS``) or a key of ``OPTIMIZERS`` (case-insensitive); slimopt
    optimizers get ``param_groups(model, rank)``: the projections take the method's matrix rule,
    everything else AdamW. ``rank`` is ignored by the methods that have none (ROOT, SubsetNorm,
    AdamW, Muon, Adafactor)."""
    key = name.lower()
    if key in PEERS:
        from .peers import BUILDERS
        builder, ranked = BUILDERS[key]
        if ranked:
            options.setdefault("rank", rank or 128)
        return builder(model, lr=lr, **options)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(KNOWN)}")
    groups = param_groups(model, rank=rank if key in RANKED else None,
                          include_head=key in HEAD_IN_MATRIX_GROUP)
    return OPTIMIZERS[key](groups, lr=lr, **options)
