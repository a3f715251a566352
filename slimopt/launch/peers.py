"""The peer optimizers the launcher and benchmarks compare against: torch's Muon (matrices) with
AdamW (the rest), and galore-torch's GaLoreAdamW."""
from __future__ import annotations

import torch

from ..param_groups import param_groups


class HybridOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (one ``param_groups`` list, so LR schedulers work):
    torch's Muon accepts only matrices, so its peer run is Muon for the projections plus AdamW for
    embeddings, head, norms and biases."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        self.defaults = {}
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self._hooks_setup = True

    @property
    def state(self):
        merged = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        for opt, sd in zip(self.optimizers, state_dict["optimizers"]):
            opt.load_state_dict(sd)


def torch_muon_with_adamw(model, lr: float, weight_decay: float = 0.1, **options):
    """torch.optim.Muon (RMS-matched, so one lr serves both) on the projections, AdamW elsewhere."""
    matrices, dense = param_groups(model)
    muon = torch.optim.Muon(matrices["params"], lr=lr, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw", **options)
    adamw = torch.optim.AdamW(dense["params"], lr=lr, weight_decay=weight_decay)
    return HybridOptimizer([muon, adamw])


def galore_torch(model, lr: float, rank: int = 128, update_interval: int = 200,
                 scale: float = 0.25, weight_decay: float = 0.0):
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise ValueError("--optimizer galore needs galore-torch: pip install galore-torch") from None
    matrices, dense = param_groups(model)
    return GaLoreAdamW([{"params": matrices["params"], "rank": rank,
                         "update_proj_gap": update_interval, "scale": scale, "proj_type": "std"},
                        {"params": dense["params"]}], lr=lr, weight_decay=weight_decay,
                       no_deprecation_warning=True)
