"""Every slimopt optimizer described once, so the generic tests run over all of them
(the idea of torch's OptimizerInfo). A new optimizer inherits the generic tests by being listed."""
from __future__ import annotations

import dataclasses
import math

import slimopt


@dataclasses.dataclass
class OptimizerInfo:
    cls: type
    #: keyword arguments for a small, fast configuration
    kwargs: dict
    #: (keyword arguments, text the error must contain), beyond the shared ones
    extra_bad: list = dataclasses.field(default_factory=list)
    #: whether the basis is kept in state
    stores_basis: bool = True

    @property
    def name(self):
        return self.cls.__name__


SHARED_BAD = [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=math.inf), "lr"),
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(betas=(1.0, 0.999)), "betas[0]"), (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(betas=0.9), "betas"), (dict(update_interval=0), "update_interval"),
    (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(scale=0.0), "scale"),
    (dict(moment_rule="rotate"), "moment_rule"), (dict(residual="none"), "residual"),
    (dict(limiter=0.5), "limiter"), (dict(recovery="yes"), "recovery"),
    (dict(nonfinite="zero"), "nonfinite"), (dict(seed=-1), "seed"),
]

BASE = dict(lr=1e-2, rank=3, update_interval=3, weight_decay=0.1)

OPTIMIZERS = [
    OptimizerInfo(slimopt.GaLore, dict(BASE)),
    OptimizerInfo(slimopt.SARA, dict(BASE)),
    OptimizerInfo(slimopt.SARA, dict(BASE, recovery=True, moment_rule="transport")),
    OptimizerInfo(slimopt.GrassJump, dict(BASE), stores_basis=False),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE),
                  extra_bad=[(dict(walk_angle=0.0), "walk_angle"), (dict(walk_angle=2.0), "walk_angle"),
                             (dict(walk_tangent_rank=2), "walk_tangent_rank"),
                             (dict(walk_init="pca"), "walk_init")]),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE, walk_tangent_rank="full", walk_init="random",
                                          residual="scaled")),
]


def info_id(info: OptimizerInfo) -> str:
    extras = [f"{k}={v}" for k, v in info.kwargs.items() if k not in BASE]
    return info.name + ("[" + ",".join(extras) + "]" if extras else "")
