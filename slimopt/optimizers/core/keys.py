"""Parameter keys: the integer that names a parameter's state and seeds its random draws.

- A **named** parameter (``model.named_parameters()`` passed as params, or a group's
  ``"param_names"``) gets ``name_key(name)``: the first 8 bytes of ``sha256(name)`` as an int
  below ``2**63``. The same parameter then draws the same random bases however the model is split
  over optimizers (per-layer optimizers, ``ZeroRedundancyOptimizer``, FSDP2/ZeRO owner ranks),
  in any process, and two matrices never share draws.
- An **unnamed** parameter gets a key from a process-wide registry: the same tensor always gets
  the same key, and no two tensors of one process share one, whatever optimizer holds them (the
  first optimizer of a fresh process numbers its parameters 0, 1, ... as slimopt always did).
  Its draws then depend on what the process created before: pass names for draws that are
  reproducible across processes and splits.

A parameter's key is also written into its state (``state["key"]``) at its first step, and the
rules read it from there: a loaded checkpoint keeps the keys it was saved with (older ones hold
position keys), so a resumed run draws exactly what the uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import itertools

from torch.utils.weak import WeakIdKeyDictionary

KEY_LIMIT = 1 << 63
_UNNAMED = WeakIdKeyDictionary()
_COUNTER = itertools.count()


def name_key(name: str) -> int:
    """The key of a parameter named ``name``: stable across processes, runs and torch versions."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % KEY_LIMIT


def unnamed_key(tensor) -> int:
    """The process-wide key of an unnamed parameter (the same for the same tensor)."""
    key = _UNNAMED.get(tensor)
    if key is None:
        key = fresh_key()
        _UNNAMED[tensor] = key
    return key


def fresh_key() -> int:
    """A key no tensor of this process has been given yet."""
    return next(_COUNTER)


def group_names(group: dict) -> list | None:
    """The names of ``group``'s parameters (its ``"param_names"``), checked; None without."""
    names = group.get("param_names")
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or len(names) != len(group["params"]) \
            or not all(isinstance(n, str) for n in names):
        raise ValueError(f"param_names must be a list of one str per parameter "
                         f"({len(group['params'])}), got {names!r}")
    return list(names)


def keys_for(group: dict, taken: dict) -> list[int]:
    """One key per parameter of ``group``; ``taken`` (key -> what holds it) are the keys of the
    optimizer's other parameters. Raises ``ValueError`` if a name is given twice."""
    names = group_names(group)
    keys = [name_key(n) for n in names] if names is not None \
        else [unnamed_key(p) for p in group["params"]]
    seen = dict(taken)
    for i, key in enumerate(keys):
        what = repr(names[i]) if names is not None \
            else f"a parameter of shape {tuple(group['params'][i].shape)}"
        if key in seen:
            raise ValueError(f"two parameters of one optimizer would share the key {key}: "
                             f"{seen[key]} and {what}; parameter names must be unique (pass the "
                             "whole model's model.named_parameters(), not those of two "
                             "submodules)")
        seen[key] = what
    return keys
