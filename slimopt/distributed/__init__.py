"""Sharded training: an engine-agnostic owner-computes core and thin engine adapters.

Each matrix is stepped whole, with the single-process code, on one owner rank, which keeps its
state; element-wise parameters follow the engine's own sharding.

- ``slimopt.distributed.owners``: the plan (``Slot``, ``Holding``, ``assign_owners``,
  ``local_owners``, ``holders``), pure and engine-agnostic;
- ``slimopt.distributed.deepspeed``: the DeepSpeed ZeRO-1/2/3 adapter (``ZeroBridge``) and
  ``initialize`` (imported on use: it needs DeepSpeed only when called).

Adapters reach an optimizer only through ``SlimOptimizer``'s public seam: ``param_key``,
``adopt_key``, ``check_options``, ``step_params`` and ``attach_step_router``.
"""
from .owners import Holding, Slot, assign_owners, holders, local_owners

__all__ = ["Holding", "Slot", "assign_owners", "holders", "local_owners"]
