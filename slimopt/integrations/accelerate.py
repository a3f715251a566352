"""accelerate with slimopt optimizers.

Without DeepSpeed ``accelerator.prepare(model, optimizer, dataloader, scheduler)`` needs nothing:
``AcceleratedOptimizer`` steps the slimopt optimizer unchanged (gradient accumulation with
``accelerator.accumulate``, ``clip_grad_norm_``, ``save_state``/``load_state``; FSDP2 through
``FullyShardedDataParallelPlugin(fsdp_version=2)`` hands it DTensor parameters, which slimopt
steps with the single-process math). With a DeepSpeed plugin, ``accelerator.prepare`` calls
``deepspeed.initialize`` with the optimizer, which then sees DeepSpeed's flat ZeRO partitions
(slimopt refuses them). ``prepare`` below is ``accelerator.prepare`` that, under DeepSpeed,
refuses what slimopt's ZeRO bridge cannot serve and installs it on the engine (what
``slimopt.launch.initialize`` does for ``deepspeed.initialize``); otherwise it is
``accelerator.prepare`` itself.

FSDP2: accelerate's ``prepare`` shards the model with ``fully_shard`` and then swaps the
optimizer's parameters in place for the new DTensor ones (``fsdp2_switch_optimizer_parameters``),
behind the optimizer's back: a slimopt optimizer would not know them (it refuses them at the
first step) and would keep the unsharded parameters alive. ``prepare`` gives each new parameter
the key of the one it replaces, forgets the old one, and attaches slimopt's FSDP2 router, so the
optimizer steps as if it had been built on the sharded model. (accelerate 1.15 takes an FSDP
plugin only on accelerators: on the CPU ``AcceleratorState`` ignores it.)
"""
from __future__ import annotations

from ..optimizers.core.base import SlimOptimizer
from .zero import ZeroSetup


def prepare(accelerator, *objects, **kwargs):
    """``accelerator.prepare(*objects, **kwargs)``, with slimopt's ZeRO bridge under DeepSpeed and
    the sharded parameters adopted under FSDP2."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    slim = [o for o in objects if isinstance(o, SlimOptimizer)]
    if slim and getattr(accelerator, "is_fsdp2", False):
        before = [[(p, o.param_key(p)) for g in o.param_groups for p in g["params"]]
                  for o in slim]
        for o in slim:
            if o.state:
                raise ValueError(f"{type(o).__name__} has state already: FSDP2 re-shards the "
                                 "parameters; prepare the optimizer before its first step")
        out = accelerator.prepare(*objects, **kwargs)
        for o, old in zip(slim, before):
            adopt_sharded(o, old)
        return out
    if plugin is None or not slim:
        return accelerator.prepare(*objects, **kwargs)
    if len(slim) > 1:
        raise ValueError("DeepSpeed takes one optimizer; got "
                         f"{len(slim)} slimopt optimizers")
    setup = ZeroSetup(slim[0], plugin.deepspeed_config)
    try:
        out = accelerator.prepare(*objects, **kwargs)
    except BaseException:
        setup.close()
        raise
    setup.attach(accelerator.deepspeed_engine_wrapped.engine)
    return out


def adopt_sharded(optimizer: SlimOptimizer, old: list) -> None:
    """After accelerate replaced ``optimizer``'s parameters in place (``old``: the
    ``(parameter, key)`` pairs before, in group order), key the new ones like the old, forget
    the old, and attach the FSDP2 router if the new ones are DTensors."""
    new = [p for g in optimizer.param_groups for p in g["params"]]
    if len(new) != len(old):
        raise RuntimeError(f"{type(optimizer).__name__}: accelerate changed the number of "
                           f"parameters ({len(old)} -> {len(new)})")
    for p, (q, _) in zip(new, old):
        if p is not q:
            optimizer.swap_parameter(q, p)  # p takes q's key and name
    optimizer.route_sharded_parameters()
