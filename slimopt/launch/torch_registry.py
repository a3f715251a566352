"""Opt-in: make slimopt's optimizers findable by name in ``torch.optim``.

Tools that resolve an optimizer name with ``getattr(torch.optim, name)`` (DeepSpeed's fallback
for an unknown JSON ``optimizer.type``, and scripts that do the same) then find ``GrassWalk``,
``SNSM``, ... Never done on import: call ``slimopt.register_with_torch_optim()`` yourself.

Under DeepSpeed ZeRO-1/2 prefer ``slimopt.launch.initialize``: an optimizer that DeepSpeed builds
by name gets DeepSpeed's flat shards, and slimopt's optimizers then stop at their first step with
an error that says so instead of silently running matrix rules on vectors.
"""
from __future__ import annotations

import torch


def register_with_torch_optim(overwrite: bool = False) -> list[str]:
    """Set ``torch.optim.<Name>`` for every slimopt optimizer; returns the names set. An existing
    attribute of the same name (say a future ``torch.optim.ROOT``) is kept unless ``overwrite``."""
    from .. import optimizers
    done = []
    for name in optimizers.__all__:
        if hasattr(torch.optim, name) and not overwrite and \
                getattr(torch.optim, name) is not getattr(optimizers, name):
            continue
        setattr(torch.optim, name, getattr(optimizers, name))
        done.append(name)
    return done
