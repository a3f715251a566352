"""Integrations with training frameworks.

- ``slimopt.integrations.transformers.SlimoptTrainer``: ``transformers.Trainer`` that keeps a
  slimopt optimizer passed in ``optimizers=`` (or built by ``optimizer_cls_and_kwargs``) under a
  DeepSpeed ZeRO config, with slimopt's exact-matrix ZeRO bridge, where the plain ``Trainer``
  drops it and trains with DeepSpeed's AdamW (huggingface/transformers#38753);
- ``slimopt.integrations.accelerate.prepare``: ``accelerator.prepare`` that does the same for an
  ``Accelerator`` with a DeepSpeed plugin;
- both, under FSDP2 (``fsdp_version=2``): accelerate shards the model after the optimizer was
  built and swaps its parameters for DTensors in place; the helpers key the new parameters like
  the old ones and attach slimopt's FSDP2 router (``accelerate.adopt_sharded``);
- ``slimopt.integrations.bypass``: a guard that refuses, before DeepSpeed's own optimizer
  updates anything, a run in which a slimopt optimizer built on a model was dropped and DeepSpeed
  steps another optimizer on that model's ZeRO partitions.

Without DeepSpeed neither helper is needed: the plain ``Trainer(optimizers=(opt, None))`` and
``accelerator.prepare(model, opt, ...)`` step slimopt's math unchanged. The modules import
``transformers``/``accelerate`` only when used.
"""
