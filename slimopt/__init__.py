"""slimopt: low-memory optimizers for LLM pretraining.

``GrassWalk``, ``GrassJump``, ``SARA`` and the ``GaLore`` baseline keep Adam's moments in a
low-rank subspace of each weight matrix; ``SNSM`` keeps momentum in a subspace with subset-norm
step sizes (``SubspaceMomentum`` and ``SubsetNorm`` are its halves); ``ROOT`` orthogonalizes
momentum robustly; ``AdaPreLoRA`` preconditions LoRA factor pairs. Every other parameter gets AdamW in the same optimizer.
"""
from . import lora
from .optimizers import (ROOT, AdaPreLoRA, SARA, SNSM, GaLore, GrassJump, GrassWalk, SubsetNorm,
                         SubspaceMomentum)
from .launch.torch_registry import register_with_torch_optim
from .param_groups import param_groups
from .factory import HFOptimizerFactory, create_optimizer, list_optimizers
from .state_bytes import state_bytes
from .step_in_backward import step_in_backward

__version__ = "0.1.0"
__all__ = ["GrassWalk", "GrassJump", "SARA", "GaLore", "SNSM", "SubspaceMomentum", "SubsetNorm",
           "ROOT", "AdaPreLoRA", "lora", "param_groups", "state_bytes",
           "register_with_torch_optim", "create_optimizer", "list_optimizers",
           "HFOptimizerFactory", "step_in_backward"]
