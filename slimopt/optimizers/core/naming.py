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
    """For a group given as ``(name, tensor)`` pairs (``model.named_parameters()``) that sets
    neither ``rank`` nor ``dense``: take its 2-D embeddings and heads out of ``group`` (in place)
    and return them as a dense group of pairs; None when there is nothing to move, or only such
    parameters. Groups that list ``param_names`` themselves (``slimopt.param_groups``) are a
    split already made and stay as they are."""
    if "rank" in group or "dense" in group:
        return None
    named = group["params"]
    if not named or not all(isinstance(x, tuple) and len(x) == 2 for x in named):
        return None
    moved = [i for i, (n, p) in enumerate(named) if p.dim() == 2 and is_embedding_or_head(n)]
    if not moved or len(moved) == len(named):
        return None
    group["params"] = [x for i, x in enumerate(named) if i not in set(moved)]
    return {"params": [named[i] for i in moved], "dense": True}
