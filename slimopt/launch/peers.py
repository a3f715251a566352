"""The peer optimizers the launcher and benchmarks compare against, each built from its own
package with the GaLore parameter split where it has a matrix rule: torch's AdamW (foreach and
fused) and Muon (matrices) + AdamW (the rest), galore-torch's GaLoreAdamW, apollo-torch's APOLLO
and APOLLO-Mini, fira's FiraAdamW and torch-optimizer's Adafactor (every parameter).

A missing package is a ``ValueError`` that names the ``pip install`` to run. Each builder's name,
package and rank flag are in its record (``slimopt.launch.records``).
"""
from __future__ import annotations

import importlib

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


def _require(module: str, package: str, peer: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the {peer} peer needs {package}: pip install {package}") from None


def _split(model):
    """(matrix params, dense params) of the GaLore split, as plain lists."""
    matrices, dense = param_groups(model)
    return matrices["params"], dense["params"]


def torch_adamw(model, lr: float, implementation: str = "foreach", **options):
    """torch.optim.AdamW on every parameter; ``implementation`` is "foreach", "fused" or
    "for-loop"."""
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True),
             "for-loop": dict(foreach=False)}
    if implementation not in flags:
        raise ValueError(f"implementation must be one of {sorted(flags)}, got {implementation!r}")
    return torch.optim.AdamW(model.parameters(), lr=lr, **flags[implementation], **options)


def torch_adamw_fused(model, lr: float, **options):
    """torch.optim.AdamW, fused: the step-time benchmark's reference."""
    return torch_adamw(model, lr, "fused", **options)


def torch_muon_with_adamw(model, lr: float, weight_decay: float = 0.1, **options):
    """torch.optim.Muon (RMS-matched, so one lr serves both) on the projections, AdamW elsewhere."""
    matrices, dense = _split(model)
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw", **options)
    adamw = torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay)
    return HybridOptimizer([muon, adamw])


def galore_torch(model, lr: float, rank: int = 128, update_interval: int = 200,
                 scale: float = 0.25, weight_decay: float = 0.0):
    """galore-torch's GaLoreAdamW: the GaLore paper's defaults (scale 0.25, "std" projection)."""
    GaLoreAdamW = _require("galore_torch", "galore-torch", "galore").GaLoreAdamW
    matrices, dense = _split(model)
    return GaLoreAdamW([{"params": matrices, "rank": rank, "update_proj_gap": update_interval,
                         "scale": scale, "proj_type": "std"},
                        {"params": dense}], lr=lr, weight_decay=weight_decay,
                       no_deprecation_warning=True)


def apollo_torch(model, lr: float, rank: int = 128, update_interval: int = 200,
                 mini: bool = False, weight_decay: float = 0.0):
    """apollo-torch's APOLLOAdamW with its README's LLaMA settings: APOLLO (channel-wise scaling,
    random projection of ``rank``, scale 1) or APOLLO-Mini (rank 1, tensor-wise scaling, scale
    128; ``rank`` is ignored)."""
    apollo = _require("apollo_torch", "apollo-torch", "apollo-mini" if mini else "apollo")
    matrices, dense = _split(model)
    group = {"params": matrices, "rank": 1 if mini else rank, "proj": "random",
             "scale_type": "tensor" if mini else "channel", "scale": 128 if mini else 1,
             "update_proj_gap": update_interval, "proj_type": "std"}
    return apollo.APOLLOAdamW([group, {"params": dense}], lr=lr, weight_decay=weight_decay)


def apollo_mini(model, lr: float, **options):
    """APOLLO-Mini: ``apollo_torch`` with ``mini=True`` (rank 1, tensor-wise scaling)."""
    return apollo_torch(model, lr, mini=True, **options)


def fira(model, lr: float, rank: int = 128, update_interval: int = 200, alpha: float = 1.0,
         weight_decay: float = 0.0):
    """fira's FiraAdamW (low-rank Adam plus the scaled full-rank residual) on the projections;
    its other group is plain AdamW."""
    FiraAdamW = _require("fira", "fira", "fira").FiraAdamW
    matrices, dense = _split(model)
    return FiraAdamW([{"params": dense},
                      {"params": matrices, "rank": rank, "update_proj_gap": update_interval,
                       "alpha": alpha, "proj_type": "std"}], lr=lr, weight_decay=weight_decay,
                     no_deprecation_warning=True)


def adafactor(model, lr: float, weight_decay: float = 0.0, beta1: float | None = None):
    """torch-optimizer's Adafactor on every parameter, with an external learning rate (no
    relative step, no parameter scaling) so it runs on the same schedule as the others."""
    Adafactor = _require("torch_optimizer", "torch-optimizer", "adafactor").Adafactor
    return Adafactor(model.parameters(), lr=lr, relative_step=False, scale_parameter=False,
                     warmup_init=False, beta1=beta1, weight_decay=weight_decay)
