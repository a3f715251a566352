"""Split a model's parameters the way GaLore's LLaMA experiments do: the linear layers' weights take
the optimizer's matrix rule, everything else (embeddings, the output head, norms, biases) AdamW.

Which layers count as linear: ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2, GPT-J style;
its weight is stored transposed, ``(in, out)``, which the matrix rules handle as any 2-D matrix).
Embeddings are the ``nn.Embedding`` modules and the model's ``get_input_embeddings()``; the output
head is ``get_output_embeddings()``, a module named ``lm_head``, and any linear whose weight is
tied to an embedding's.
"""
from __future__ import annotations

import re
import sys
import warnings

import torch
from torch import nn

#: module-name suffixes of LLaMA's attention and MLP projections
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ``targets`` value for every linear layer except embeddings and the output head
ALL_LINEAR = "all-linear"


def _linear_types() -> tuple:
    """``nn.Linear``, plus HF's ``Conv1D`` when transformers is loaded (a model that holds
    ``Conv1D`` modules has loaded it; slimopt never imports transformers for this)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _module_weight(module):
    weight = getattr(module, "weight", None) if module is not None else None
    return weight if isinstance(weight, torch.Tensor) else None


def _call(model, getter: str):
    method = getattr(model, getter, None)
    try:
        return method() if callable(method) else None
    except (NotImplementedError, AttributeError):
        return None


def _special_weights(model: nn.Module, linears: list) -> tuple[set, set]:
    """(ids of embedding weights, ids of output-head weights not tied to an embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    input_weight = _module_weight(_call(model, "get_input_embeddings"))
    if input_weight is not None:
        embeddings.add(id(input_weight))
    output_weight = _module_weight(_call(model, "get_output_embeddings"))
    heads = set() if output_weight is None else {id(output_weight)}
    heads |= {id(m.weight) for name, m in linears if name.split(".")[-1] == "lm_head"}
    return embeddings, heads - embeddings


def _matcher(targets):
    """A predicate on full module names, or None for "all-linear"."""
    if isinstance(targets, re.Pattern):
        return lambda name: targets.search(name) is not None
    if isinstance(targets, str):
        if targets.replace("_", "-").lower() == ALL_LINEAR:
            return None
        if targets.startswith("re:"):
            pattern = re.compile(targets[3:])
            return lambda name: pattern.search(name) is not None
        targets = (targets,)
    if not isinstance(targets, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, str) and t for t in targets):
        raise TypeError("targets must be module-name suffixes (a list of str), a compiled regex, "
                        f"a string 're:PATTERN', or 'all-linear'; got {targets!r}")
    suffixes = tuple(targets)
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _describe(targets) -> str:
    return targets.pattern if isinstance(targets, re.Pattern) else repr(targets)


def _warn_coverage(body: list, chosen_ids: set, targets, stacklevel: int) -> None:
    """Warn when the matrix group holds fewer than half of the body's linear weights."""
    left = [name for name, m in body if id(m.weight) not in chosen_ids]
    if not body or 2 * (len(body) - len(left)) >= len(body):
        return
    shown = ", ".join(left[:8]) + (f", ... ({len(left) - 8} more)" if len(left) > 8 else "")
    suffixes = sorted({name.split(".")[-1] for name in left})
    warnings.warn(
        f"param_groups: the matrix group holds {len(body) - len(left)} of the model's "
        f"{len(body)} linear weights (outside embeddings and the output head) with "
        f"targets={_describe(targets)}; these stay dense (AdamW): {shown}. To include them pass "
        f"targets='all-linear' (or the default targets=None), or add their names, e.g. "
        f"targets={suffixes!r}.", UserWarning, stacklevel=stacklevel)


def select_matrices(model: nn.Module, targets=None, *,
                    stacklevel: int = 2) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the linear layers whose weights ``param_groups`` puts in the matrix
    group (see ``param_groups`` for ``targets``); warns when they are fewer than half of the
    trainable linear weights outside embeddings and the head, and raises ValueError when explicit
    ``targets`` match none. ``stacklevel``: the warning's, as ``warnings.warn`` counts from the
    caller of this function."""
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, _linear_types()) and _module_weight(m) is not None
               and m.weight.dim() == 2]
    embeddings, heads = _special_weights(model, linears)
    body = [(name, m) for name, m in linears if m.weight.requires_grad
            and id(m.weight) not in embeddings and id(m.weight) not in heads]
    match = _matcher(ALL_LINEAR if targets is None else targets)
    if match is None:
        chosen = body
    else:  # explicit names or a pattern may pick the head, never an embedding
        chosen = [(name, m) for name, m in linears if match(name) and m.weight.requires_grad
                  and id(m.weight) not in embeddings]
    if not chosen and targets is not None:
        raise ValueError(f"param_groups: no nn.Linear (or HF Conv1D) layer with trainable weights "
                         f"matches targets={_describe(targets)}; its linear layers are "
                         f"{[name for name, _ in linears][:12]}")
    if not chosen:
        warnings.warn("param_groups: the model has no trainable linear layer (nn.Linear or HF "
                      "Conv1D) outside its embeddings and output head, so the matrix group is "
                      "empty and every parameter gets AdamW; pass targets=... naming the "
                      "layers that should take the matrix rule", UserWarning, stacklevel=stacklevel)
    _warn_coverage(body, {id(m.weight) for _, m in chosen}, targets, stacklevel + 1)
    return chosen


def _head_weight(model: nn.Module):
    """The output head's weight when it is not tied to an embedding, else None."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, _linear_types())
               and _module_weight(m) is not None]
    _, heads = _special_weights(model, linears)
    return next((p for p in model.parameters() if id(p) in heads and p.dim() == 2), None)


def param_groups(model: nn.Module, rank: int | None = None, *, targets=None,
                 include_head: bool = False, names: bool = True,
                 **low_rank_options) -> list[dict]:
    """Two parameter groups: the matrix one and a dense one (``dense=True``; ``rank=None`` too
    when ``rank`` is given).

    ``targets`` picks the linear layers (``nn.Linear``, HF ``Conv1D``) whose weights take the
    matrix rule:

    * ``None`` (default) or ``"all-linear"``: every trainable linear layer except embeddings and
      the output head. On LLaMA these are exactly ``PROJECTION_NAMES``; on models with fused
      projections (Phi-3's ``qkv_proj``, ``gate_up_proj``), GPT-2's ``Conv1D`` or other names
      (GPT-NeoX, T5) it takes them all, as HF's ``optim_target_modules="all-linear"``;
    * module-name suffixes, a list of str (``["q_proj", "v_proj"]``; ``"attn.c_attn"`` matches
      a dotted tail); a single str is one suffix;
    * a regex: a compiled ``re.Pattern`` or a string ``"re:PATTERN"``, ``re.search``-ed against
      the full module name (``"re:layers\\.[0-3]\\..*_proj"``).

    Names and patterns can pick the head; weights tied to an embedding always stay dense.
    Everything else -- embeddings, the head, norms, biases -- goes to the dense group, except that
    ``include_head=True`` puts the output head's weight in the matrix group (SN-SM's split),
    unless it is tied to the input embedding. A UserWarning names the linear weights left dense
    when the matrix group holds fewer than half of them (or none); explicit ``targets`` that
    match nothing raise ValueError.
    ``rank`` (if given) and ``low_rank_options`` (``update_interval``, ``scale``, ...) apply to
    the matrix group; every slimopt optimizer gives the dense group AdamW. ``names=True`` adds
    torch's ``param_names`` to each group (then ``add_param_group`` needs them too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    low_rank_ids = {id(m.weight) for _, m in select_matrices(model, targets, stacklevel=3)}
    if include_head:
        head = _head_weight(model)
        if head is not None:
            low_rank_ids.add(id(head))
    param_names = {}
    for name, p in model.named_parameters():  # skips shared duplicates: first name wins
        param_names.setdefault(id(p), name)
    low, dense = [], []
    for p in model.parameters():
        if p.requires_grad:
            (low if id(p) in low_rank_ids and p.dim() == 2 else dense).append(p)
    matrix_group = {"params": low, **low_rank_options}
    if rank is not None:
        matrix_group["rank"] = rank
    groups = [matrix_group]
    if dense:  # "rank": None only beside a rank: ROOT and SubsetNorm have no such option
        groups.append({"params": dense, "dense": True, **({} if rank is None else {"rank": None})})
    if names:
        for group in groups:
            group["param_names"] = [param_names[id(p)] for p in group["params"]]
    return groups
