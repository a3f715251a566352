"""slimopt's optimizers by name, and building one for a model with the GaLore parameter split.
The names and facts come from the method records (``slimopt.launch.records``)."""
from __future__ import annotations

import torch

from ..param_groups import param_groups
from .records import BY_NAME, CLI, LORA_PAIRS, MATRICES_AND_HEAD, Method, cli_defaults, in_suite

__all__ = ["OPTIMIZERS", "PEERS", "RANKED", "KNOWN", "HEAD_IN_MATRIX_GROUP", "build_optimizer",
           "split_for", "cli_defaults"]

#: slimopt's pretraining optimizers by launcher name
OPTIMIZERS = {m.name: m.build for m in in_suite(CLI) if not m.is_peer}
#: the peers (``slimopt.launch.peers``): torch's AdamW (foreach, fused) and Muon + AdamW,
#: galore-torch, apollo-torch (APOLLO, APOLLO-Mini), fira, torch-optimizer's Adafactor
PEERS = {m.name for m in in_suite(CLI) if m.is_peer}
#: optimizers whose matrix rule takes a rank (and an update interval)
RANKED = {m.name for m in in_suite(CLI) if m.ranked}
KNOWN = set(OPTIMIZERS) | PEERS
#: optimizers whose papers put the output head in the matrix group
HEAD_IN_MATRIX_GROUP = {m.name for m in in_suite(CLI) if m.split == MATRICES_AND_HEAD}


def split_for(method: Method, model: torch.nn.Module, rank: int | None = None):
    """What ``method``'s constructor takes for ``model``: ``param_groups(model, rank)`` (the
    head in the matrix group where the method's papers put it; ``rank`` only for a ranked
    method), or the model itself for a LoRA-pair method, which finds its pairs."""
    if method.split == LORA_PAIRS:
        return model
    return param_groups(model, rank=rank if method.ranked else None,
                        include_head=method.split == MATRICES_AND_HEAD)


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, rank: int | None = 128,
                    **options) -> torch.optim.Optimizer:
    """``name`` is a peer (see ``PEERS``) or a key of ``OPTIMIZERS`` (case-insensitive); slimopt
    optimizers get ``param_groups(model, rank)``: the projections take the method's matrix rule,
    everything else AdamW. ``rank`` is ignored by the methods that have none (ROOT, SubsetNorm,
    AdamW, Muon, Adafactor)."""
    key = name.lower()
    if key not in KNOWN:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(KNOWN)}")
    method = BY_NAME[key]
    if method.is_peer:
        if method.ranked:
            options.setdefault("rank", rank or 128)
        return method.build(model, lr=lr, **options)
    return method.build(split_for(method, model, rank), lr=lr, **options)
