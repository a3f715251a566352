"""Refuse a DeepSpeed run that dropped a slimopt optimizer (before it updates anything).

HF ``Trainer`` under a DeepSpeed config drops an optimizer passed in ``optimizers=`` and trains
with AdamW instead (huggingface/transformers#38753); nothing tells the user. ``watch(optimizer)``
(called for every slimopt optimizer once ``install()`` is in effect) remembers the parameters a
slimopt optimizer was built on; a global ``torch.optim`` step pre-hook then raises
``RuntimeError`` when a non-slimopt optimizer steps while one of those parameters is managed by
DeepSpeed ZeRO (it carries ``_hp_mapping`` (ZeRO-1/2) or ``ds_id`` (ZeRO-3)) and the slimopt
optimizer built on it is gone or was never attached to an engine (no step router, no step).
DeepSpeed links ``_hp_mapping`` after its own state-creating step, so the hook fires at the
first training step, before the other optimizer changes a weight.

Not a false positive: a slimopt optimizer that steps DeepSpeed's engine (``slimopt.launch.
initialize``, ``SlimoptTrainer``, ``slimopt.integrations.accelerate.prepare``) has a step router;
two optimizers outside DeepSpeed never meet the check (no ZeRO-managed parameter). A false
positive remains possible only if one builds a slimopt optimizer on a model, drops it, and then
deliberately trains that model with DeepSpeed's own optimizer: ``unwatch(optimizer)`` or
``disable()`` says so.
"""
from __future__ import annotations

import weakref


_watched = {}   # id(param) -> (weakref(param), weakref(optimizer), optimizer class name)
#: steps checked per foreign optimizer: its first ``CHECKED_STEPS`` (DeepSpeed's state-creating
#: step inside ``deepspeed.initialize`` comes before it links the parameters; the first training
#: step is the second), none after, so the hook costs nothing in a long run
_seen = weakref.WeakKeyDictionary()
CHECKED_STEPS = 3
_handle = None


def _ds_managed(p) -> bool:
    return hasattr(p, "_hp_mapping") and p._hp_mapping is not None or hasattr(p, "ds_id")


def _engaged(opt) -> bool:
    return opt is not None and (getattr(opt, "step_router", None) is not None or
                                any(opt.state.values()))


def watch(optimizer) -> None:
    """Remember ``optimizer``'s parameters (see the module docstring) and install the hook."""
    install()
    ref = weakref.ref(optimizer)
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        for p in group["params"]:
            key = id(p)
            _watched[key] = (weakref.ref(p, lambda _, key=key: _watched.pop(key, None)), ref,
                             name)


def unwatch(optimizer) -> None:
    for key, (_, ref, _) in list(_watched.items()):
        if ref() is optimizer:
            del _watched[key]


def _pre_step(optimizer, args, kwargs):
    from ..optimizers.core.base import SlimOptimizer
    if not _watched or isinstance(optimizer, SlimOptimizer):
        return
    seen = _seen.get(optimizer, 0)
    if seen >= CHECKED_STEPS:
        return
    _seen[optimizer] = seen + 1
    for p_ref, opt_ref, name in list(_watched.values()):
        p = p_ref()
        if p is None or not _ds_managed(p):
            continue
        owner = opt_ref()
        if _engaged(owner):
            continue
        raise RuntimeError(
            f"A {name} optimizer was built on this model, but DeepSpeed is about to step "
            f"{type(optimizer).__name__} on it instead ({'dropped' if owner is None else 'unused'}"
            " slimopt optimizer; HF Trainer drops an optimizer passed in optimizers= under a "
            "DeepSpeed config, huggingface/transformers#38753). Nothing was updated. Use "
            "slimopt.integrations.transformers.SlimoptTrainer in place of transformers.Trainer "
            "(or slimopt.integrations.accelerate.prepare with accelerate, "
            "slimopt.launch.initialize with DeepSpeed alone), or train without DeepSpeed "
            "(DDP, or FSDP2).")


def install() -> None:
    """Register the global step pre-hook (once)."""
    global _handle
    if _handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        _handle = register_optimizer_step_pre_hook(_pre_step)


def disable() -> None:
    """Remove the hook and forget every watched optimizer."""
    global _handle
    if _handle is not None:
        _handle.remove()
        _handle = None
    _watched.clear()
