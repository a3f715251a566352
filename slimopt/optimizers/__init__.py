"""slimopt's optimizers: one module per method, each a short recipe over ``core``."""
from .adaprelora import AdaPreLoRA
from .galore import GaLore
from .grassjump import GrassJump
from .grasswalk import GrassWalk
from .root import ROOT
from .sara import SARA
from .snsm import SNSM, SubspaceMomentum
from .subset_norm import SubsetNorm

__all__ = ["AdaPreLoRA", "GaLore", "GrassJump", "GrassWalk", "ROOT", "SARA", "SNSM", "SubspaceMomentum",
           "SubsetNorm"]
