"""slimopt: low-memory optimizers for LLM pretraining.

``GrassWalk``, ``GrassJump``, ``SARA`` and the ``GaLore`` baseline keep Adam's moments in a
low-rank subspace of each weight matrix; every other parameter gets AdamW in the same optimizer.
"""
from .optimizers import GaLore, GrassJump, GrassWalk, SARA
from .param_groups import param_groups
from .state_bytes import state_bytes

__version__ = "0.1.0"
__all__ = ["GrassWalk", "GrassJump", "SARA", "GaLore", "param_groups", "state_bytes"]
