"""Sharded training: an engine-agnostic owner-computes core and thin engine adapters.

Each matrix (or LoRA pair) is stepped whole, with the single-process code, on one owner rank,
which keeps its state; element-wise parameters step on the shard each rank already holds.

- ``slimopt.distributed.owners``: planning primitives (``Slot``, ``Holding``, ``assign_owners``,
  ``holders``, ``row_shares``), pure and engine-agnostic;
- ``slimopt.distributed.transfer``: bringing a matrix whole to its owner and back
  (``Transfer``: rooted gather/scatter, ``all_to_all`` rounds, a joint vote on flags);
- ``slimopt.distributed.fsdp``: the owner plan of both engines (``plan``) and the FSDP2 adapter
  (``FSDPRouter``, attached by the optimizer itself on DTensor parameters);
- ``slimopt.distributed.deepspeed``: the DeepSpeed ZeRO-1/2/3 adapter (``ZeroBridge``) and
  ``initialize`` (imported on use: it needs DeepSpeed only when called).

Adapters reach an optimizer only through ``SlimOptimizer``'s public seam: ``param_key``,
``adopt_key``, ``check_options``, ``step_params`` and ``attach_step_router``.
"""
from .owners import Holding, Slot, assign_owners, holders, row_shares

__all__ = ["Holding", "Slot", "assign_owners", "holders", "row_shares"]
