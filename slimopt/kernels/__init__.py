"""Shared numerical kernels. Each family has a pure-torch reference that runs anywhere and a
Triton version for CUDA tensors (``dispatch.backend`` picks)."""
from .newton_schulz import MUON_COEFFICIENTS, newton_schulz, newton_schulz_torch
from .projection import project, project_adam_moments_, project_back

__all__ = ["MUON_COEFFICIENTS", "newton_schulz", "newton_schulz_torch", "project",
           "project_adam_moments_", "project_back"]
