"""What ``slimopt.launch.initialize`` does around ``deepspeed.initialize``, split into the part
before the engine exists (``ZeroSetup.__init__``: refuse unsupported configs, skip DeepSpeed's
state-creating step on zero gradients) and the part after (``ZeroSetup.attach``: the bridge), for
frameworks that call ``deepspeed.initialize`` themselves (accelerate, and HF Trainer through it)."""
from __future__ import annotations

import contextlib

from ..distributed.deepspeed import (_first_step_skipped, attach_to_engine,
                                     read_checkpoints_safely, refuse_offload)
from ..optimizers.core.base import SlimOptimizer


def check_config(optimizer: SlimOptimizer, config: dict) -> int:
    """Refuse a DeepSpeed config slimopt's bridge cannot serve (as ``initialize`` does); returns
    the ZeRO stage."""
    name = type(optimizer).__name__
    if isinstance(config.get("optimizer"), dict):
        raise ValueError(
            f"{name}: the DeepSpeed config has an \"optimizer\" section "
            f"({config['optimizer'].get('type')!r}), so DeepSpeed would build and step that "
            "optimizer instead of the slimopt one: remove the section")
    zero_cfg = config.get("zero_optimization", {}) or {}
    refuse_offload(optimizer, zero_cfg)
    fp16 = (config.get("fp16") or {}).get("enabled")
    if fp16 is True or str(fp16).lower() == "true":
        raise ValueError("fp16 with slimopt optimizers is not supported; use bf16")
    stage = int(zero_cfg.get("stage", 0) or 0)
    if stage >= 1:
        optimizer.check_sharding_engine(f"DeepSpeed ZeRO-{stage}")
    return stage


class ZeroSetup:
    """Built before the framework calls ``deepspeed.initialize`` with ``optimizer``; ``attach``
    after, with the engine."""

    def __init__(self, optimizer: SlimOptimizer, config: dict):
        self.optimizer = optimizer
        self.stage = check_config(optimizer, config)
        if self.stage >= 1:
            config["zero_allow_untested_optimizer"] = True  # as transformers/accelerate do
        self.attached = False
        self._skip = contextlib.ExitStack()
        self._skip.enter_context(_first_step_skipped(optimizer))

    def close(self) -> None:
        """Undo the step skip without attaching (the framework failed to build the engine)."""
        self._skip.close()

    def attach(self, engine) -> None:
        """Install the bridge on ``engine`` (a ``DeepSpeedEngine`` built on ``self.optimizer``)."""
        if self.attached:
            return
        self._skip.close()
        inner = getattr(engine, "optimizer", None)
        if getattr(inner, "optimizer", inner) is not self.optimizer:
            raise RuntimeError(
                f"{type(self.optimizer).__name__}: the DeepSpeed engine steps "
                f"{type(getattr(inner, 'optimizer', inner)).__name__}, not this optimizer")
        read_checkpoints_safely(engine)
        attach_to_engine(self.optimizer, engine, self.stage)
        self.attached = True
