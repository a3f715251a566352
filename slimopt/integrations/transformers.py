"""HF ``Trainer`` with slimopt optimizers.

Without DeepSpeed the plain ``transformers.Trainer(optimizers=(opt, None))`` steps a slimopt
optimizer unchanged (checkpoints and ``resume_from_checkpoint`` included). With a DeepSpeed config
it does not: ``transformers.integrations.deepspeed.deepspeed_init`` sets ``trainer.optimizer =
None`` and builds the optimizer of ``TrainingArguments.optim`` (AdamW) instead, silently
(huggingface/transformers#38753); a slimopt optimizer from ``optimizer_cls_and_kwargs`` reaches
``deepspeed.initialize`` but then sees DeepSpeed's flat ZeRO partitions, which slimopt refuses.

``SlimoptTrainer`` is the ``Trainer`` to use there: it hands DeepSpeed the slimopt optimizer
(from ``optimizers=`` or ``optimizer_cls_and_kwargs``), refuses what the bridge cannot serve
(an ``"optimizer"`` section in the DeepSpeed config, optimizer/parameter offload, fp16), and
installs slimopt's ZeRO bridge (``slimopt.distributed.deepspeed.ZeroBridge``, as
``slimopt.launch.initialize`` does) on the engine accelerate builds, before a checkpoint is
loaded and before the first step. Each matrix is then stepped whole, on its owner rank, with the
single-process math.

FSDP2 (``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2, ...})``; the Trainer
refuses ``optimizers=`` there, so build the optimizer with ``optimizer_cls_and_kwargs=
(slimopt.HFOptimizerFactory(...), {...})``): accelerate shards the model after the optimizer was
built and swaps its parameters for DTensors in place; ``SlimoptTrainer`` gives the new
parameters the old ones' keys and attaches slimopt's FSDP2 router
(``slimopt.integrations.accelerate.adopt_sharded``). Otherwise it is the plain ``Trainer``.
"""
from __future__ import annotations

import transformers

from ..optimizers.core.base import SlimOptimizer
from .accelerate import adopt_sharded
from .zero import ZeroSetup, check_config


class SlimoptTrainer(transformers.Trainer):
    """``transformers.Trainer`` that keeps a slimopt optimizer under DeepSpeed ZeRO (see the
    module docstring). ``trainer.slimopt_optimizer`` is the slimopt optimizer in effect (None
    before training, or when the optimizer is not a slimopt one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # deepspeed_init drops self.optimizer; keep the one we were handed
        self._slimopt_given = self.optimizer if isinstance(self.optimizer, SlimOptimizer) \
            else None
        self._zero_setup = None
        self._fsdp2_before = None   # (optimizer, [(parameter, key)]) before accelerate shards
        self.add_callback(_RequireSlimopt(self))

    @property
    def slimopt_optimizer(self):
        if self._zero_setup is not None:
            return self._zero_setup.optimizer
        opt = self.optimizer
        while opt is not None and not isinstance(opt, SlimOptimizer):
            opt = getattr(opt, "optimizer", None)
        return opt

    def create_optimizer(self, model=None):
        if self.is_deepspeed_enabled and self.optimizer is None and \
                self._slimopt_given is not None:
            self.optimizer = self._slimopt_given
        optimizer = super().create_optimizer(model)
        if self.is_deepspeed_enabled and isinstance(optimizer, SlimOptimizer) and \
                (self._zero_setup is None or self._zero_setup.optimizer is not optimizer):
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            self._zero_setup = ZeroSetup(optimizer, config)
        if self._is_fsdp2() and isinstance(optimizer, SlimOptimizer) and \
                optimizer.step_router is None and self._fsdp2_before is None:
            self._fsdp2_before = (optimizer, [(p, optimizer.param_key(p))
                                              for g in optimizer.param_groups
                                              for p in g["params"]])
        return optimizer

    def _is_fsdp2(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return bool(self.is_fsdp_enabled) and getattr(plugin, "fsdp_version", 1) == 2

    def create_scheduler(self, num_training_steps, optimizer=None):
        # Trainer._prepare_for_training calls this right after accelerator.prepare built the
        # DeepSpeed engine, before it loads a checkpoint: the bridge goes on here.
        self._attach_bridge()
        return super().create_scheduler(num_training_steps, optimizer)

    def _attach_bridge(self):
        if self._fsdp2_before is not None:
            optimizer, before = self._fsdp2_before
            if any(p is not q for p, (q, _) in zip(
                    (p for g in optimizer.param_groups for p in g["params"]), before)):
                adopt_sharded(optimizer, before)   # accelerate has sharded the model
                self._fsdp2_before = None
        if not self.is_deepspeed_enabled:
            return
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if self._slimopt_given is not None and self._zero_setup is None and wrapped is not None:
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            check_config(self._slimopt_given, config)  # names the "optimizer" section
            raise RuntimeError(
                f"{type(self._slimopt_given).__name__} was not handed to DeepSpeed")
        if self._zero_setup is not None and wrapped is not None:
            self._zero_setup.attach(wrapped.engine)


class _RequireSlimopt(transformers.TrainerCallback):
    """Refuses, at ``on_train_begin`` (before the first step), a DeepSpeed run in which the
    slimopt optimizer is not the one in effect or has no bridge."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._attach_bridge()
        if trainer._fsdp2_before is not None and trainer._fsdp2_before[0].step_router is None:
            raise RuntimeError(
                f"{type(trainer._fsdp2_before[0]).__name__}: FSDP2 did not shard the parameters "
                "it was built on; nothing was trained")
        if not trainer.is_deepspeed_enabled:
            return
        setup = trainer._zero_setup
        if trainer._slimopt_given is not None and (setup is None or not setup.attached):
            raise RuntimeError(
                f"{type(trainer._slimopt_given).__name__}: the DeepSpeed engine was built "
                "without it; nothing was trained")
