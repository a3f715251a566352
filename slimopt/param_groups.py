"""Split a model's parameters the way GaLore's LLaMA experiments do."""
from __future__ import annotations

import torch
from torch import nn

#: module-name suffixes of LLaMA's attention and MLP projections
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _output_head(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head


def param_groups(model: nn.Module, rank: int | None = None, *, targets=None,
                 include_head: bool = False, **low_rank_options) -> list[dict]:
    """Two parameter groups: the matrix one and a dense one (``dense=True``, ``rank=None``).

    The low-rank group holds the weights of the ``nn.Linear`` modules whose name ends in one of
    ``targets`` (default: LLaMA's ``q/k/v/o_proj`` and ``gate/up/down_proj``); if the model has
    none of those (a plain module), every ``nn.Linear`` weight except the output head (the model's
    ``get_output_embeddings()`` or a module named ``lm_head``) and weights tied to an embedding.
    Everything else -- embeddings, the head, norms, biases -- goes to the dense group, except that
    ``include_head=True`` puts the output head's weight in the matrix group (SN-SM's split),
    unless it is tied to the input embedding.
    ``rank`` (if given) and ``low_rank_options`` (``update_interval``, ``scale``, ...) apply to
    the matrix group; every slimopt optimizer gives the dense group AdamW.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    head = _output_head(model)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = tuple(targets) if targets is not None else PROJECTION_NAMES
    chosen = [m for name, m in linears if name.split(".")[-1] in names]
    if not chosen and targets is None:
        chosen = [m for name, m in linears
                  if m is not head and name.split(".")[-1] != "lm_head"
                  and id(m.weight) not in embedding_weights]
    if targets is not None and not chosen:
        raise ValueError(f"param_groups: no nn.Linear module named {list(names)} in the model")
    low_rank_ids = {id(m.weight) for m in chosen}
    if include_head:
        named_head = dict(linears).get("lm_head")
        head_module = head if isinstance(head, nn.Linear) else named_head
        if head_module is not None and id(head_module.weight) not in embedding_weights:
            low_rank_ids.add(id(head_module.weight))
    low, dense, seen = [], [], set()
    for p in model.parameters():  # model.parameters() already skips shared duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (low if id(p) in low_rank_ids and p.dim() == 2 else dense).append(p)
    matrix_group = {"params": low, **low_rank_options}
    if rank is not None:
        matrix_group["rank"] = rank
    groups = [matrix_group]
    if dense:
        groups.append({"params": dense, "rank": None, "dense": True})
    return groups
