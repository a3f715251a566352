"""The DeepSpeed integration's former home, kept so that existing imports work: the adapter is
``slimopt.distributed.deepspeed`` (``initialize``, ``ZeroBridge``), the owner planning
``slimopt.distributed.owners``."""
from ..distributed.deepspeed import (PREFIX, ZeroBridge, build_from_config, initialize,
                                     raise_on_skipped_steps, read_checkpoints_safely,
                                     register_master_copies)
from ..distributed.owners import Holding, Slot, assign_owners, holders

__all__ = ["PREFIX", "Holding", "Slot", "ZeroBridge", "assign_owners", "build_from_config",
           "holders", "initialize", "raise_on_skipped_steps",
           "read_checkpoints_safely", "register_master_copies"]
