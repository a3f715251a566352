"""GaLore's policy: the top-r left singular vectors of the current gradient."""
from __future__ import annotations

import torch

from .base import BasisPolicy


class TopSVD(BasisPolicy):
    def next(self, basis, grad, rank, gen):
        u, _, _ = torch.linalg.svd(grad, full_matrices=False)
        return u[:, :rank].contiguous()
