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
"""
from __future__ import annotations

from ..optimizers.core.base import SlimOptimizer
from .zero import ZeroSetup


def prepare(accelerator, *objects, **kwargs):
    """``accelerator.prepare(*objects, **kwargs)``, with slimopt's ZeRO bridge under DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    slim = [o for o in objects if isinstance(o, SlimOptimizer)]
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
