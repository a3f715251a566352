"""Telling embeddings and output heads by their parameters' names, for the one-line swap
``Cls(model.named_parameters())``: GaLore's and transformers' convention keeps them dense (AdamW),
as ``slimopt.param_groups`` does by module type; given only names, the optimizer does it by name.
"""
from __future__ import annotations

#: module names (the last part before ``.weight``) of output heads
HEAD_MODULES = frozenset({"lm_head", "output", "head", "embed_out", "classifier", "score"})
#: module names of embeddings besides those containing "embed" (GPT-2's token and position
#: tables, T5's shared table)
EMBEDDING_MODULES = frozenset({"wte", "wpe", "shared"})


def is_embedding_or_head(name: str) -> bool:
    """Whether the parameter named ``name`` (``model.named_parameters()``'s) belongs to an
    embedding or an output head."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    return "embed" in module or module in HEAD_MODULES or module in EMBEDDING_MODULES


def split_named_embeddings(group: dict) -> dict | None:
    """For a group of named parameters that sets neither ``rank`` nor ``dense``: take its 2-D
    embeddings and heads out of ``group`` (in place) and return them as a dense group in the
    same form (``(name, tensor)`` pairs, or ``params`` with ``param_names``); None when there is
    nothing to move, or only such parameters."""
    if "rank" in group or "dense" in group:
        return None
    params = group["params"]
    pairs = all(isinstance(x, tuple) and len(x) == 2 for x in params) and bool(params)
    if pairs:
        named = list(params)
    elif "param_names" in group and len(group["param_names"]) == len(params):
        named = list(zip(group["param_names"], params))
    else:
        return None
    moved = [i for i, (n, p) in enumerate(named) if p.dim() == 2 and is_embedding_or_head(n)]
    if not moved or len(moved) == len(named):
        return None
    kept = [x for i, x in enumerate(named) if i not in set(moved)]
    out = [named[i] for i in moved]
    if pairs:
        group["params"] = kept
        return {"params": out, "dense": True}
    group["params"], group["param_names"] = [p for _, p in kept], [n for n, _ in kept]
    return {"params": [p for _, p in out], "param_names": [n for n, _ in out], "dense": True}
