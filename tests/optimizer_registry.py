"""Every slimopt optimizer described once, so the generic tests run over all of them
(the idea of torch's OptimizerInfo). A new optimizer inherits the generic tests by being listed."""
from __future__ import annotations

import dataclasses
import math

import slimopt
from slimopt.optimizers import ROOT, SNSM, SubsetNorm, SubspaceMomentum


def _sorted(p):
    d, k = sorted(p.shape)
    return d, k


@dataclasses.dataclass
class OptimizerInfo:
    cls: type
    #: keyword arguments for a small, fast configuration
    kwargs: dict
    #: float32 numbers of state for a parameter the method's own rule takes: f(param, kwargs)
    state_floats: callable
    #: (keyword arguments, text the error must contain), beyond the universal ones
    bad: list = dataclasses.field(default_factory=list)
    #: a group override that must raise
    group_bad: dict = dataclasses.field(default_factory=lambda: {"rank": -2})
    #: a low-rank method with a rank (full rank -> dense AdamW with a warning)
    subspace: bool = True
    #: learning rate for the least-squares test
    ls_lr: float = 0.2

    @property
    def name(self):
        return self.cls.__name__


UNIVERSAL_BAD = [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=math.inf), "lr"),
    (dict(betas=(1.5, 0.999)), "betas[0]"), (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(betas=0.9), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(nonfinite="zero"), "nonfinite"),
]
SUBSPACE_BAD = [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(update_interval=0), "update_interval"), (dict(moment_rule="rotate"), "moment_rule"),
    (dict(seed=-1), "seed"),
]
ADAM_BAD = SUBSPACE_BAD + [
    (dict(betas=(0.9, 1.0)), "betas[1]"), (dict(scale=0.0), "scale"),
    (dict(residual="none"), "residual"), (dict(limiter=0.5), "limiter"),
    (dict(recovery="yes"), "recovery"),
]
WALK_BAD = ADAM_BAD + [
    (dict(walk_angle=0.0), "walk_angle"), (dict(walk_angle=2.0), "walk_angle"),
    (dict(walk_tangent_rank=2), "walk_tangent_rank"), (dict(walk_init="pca"), "walk_init"),
]
SNSM_BAD = SUBSPACE_BAD + [(dict(subset_norm="yes"), "subset_norm")]

BASE = dict(lr=1e-2, rank=3, update_interval=3, weight_decay=0.1)


def adam_floats(stores_basis=True):
    def floats(p, kw):
        d, k = _sorted(p)
        return 2 * kw["rank"] * k + (d * kw["rank"] if stores_basis else 0)
    return floats


def snsm_floats(p, kw):
    d, k = _sorted(p)
    return kw["rank"] * k + d * kw["rank"] + k


def sm_floats(p, kw):
    d, k = _sorted(p)
    return kw["rank"] * k + d * kw["rank"]


def subset_norm_floats(p, kw):
    from slimopt.optimizers.core.subset_norm import accumulator_shape, default_layout
    acc = math.prod(accumulator_shape(tuple(p.shape), default_layout(tuple(p.shape), "auto")))
    return p.numel() + acc


OPTIMIZERS = [
    OptimizerInfo(slimopt.GaLore, dict(BASE), adam_floats(), ADAM_BAD),
    OptimizerInfo(slimopt.SARA, dict(BASE), adam_floats(), ADAM_BAD),
    OptimizerInfo(slimopt.SARA, dict(BASE, recovery=True, moment_rule="transport"), adam_floats(),
                  ADAM_BAD),
    OptimizerInfo(slimopt.GrassJump, dict(BASE), adam_floats(stores_basis=False), ADAM_BAD),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE), adam_floats(), WALK_BAD),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE, walk_tangent_rank="full", walk_init="random",
                                          residual="scaled"), adam_floats(), WALK_BAD),
    OptimizerInfo(SNSM, dict(BASE), snsm_floats, SNSM_BAD),
    OptimizerInfo(SNSM, dict(BASE, betas=(0.9, 1.0)), snsm_floats, SNSM_BAD, ls_lr=1.0),
    OptimizerInfo(SubspaceMomentum, dict(BASE), sm_floats, SNSM_BAD, ls_lr=1.0),
    OptimizerInfo(SubsetNorm, dict(lr=1e-2, weight_decay=0.1), subset_norm_floats,
                  [(dict(subset_size=0), "subset_size"), (dict(subset_size="rows"), "subset_size"),
                   (dict(rank=4), "unexpected")], group_bad={"subset_size": -1}, subspace=False),
    OptimizerInfo(ROOT, dict(lr=1e-2, weight_decay=0.1), lambda p, kw: p.numel(),
                  [(dict(percentile=2.0), "percentile"), (dict(ns_steps=0), "ns_steps")],
                  group_bad={"momentum": 2.0}, subspace=False, ls_lr=0.05),
    OptimizerInfo(ROOT, dict(lr=1e-2, weight_decay=0.1, percentile=None, coefficients="muon",
                             nesterov=False), lambda p, kw: p.numel(), [],
                  group_bad={"momentum": 2.0}, subspace=False, ls_lr=0.05),
]


def info_id(info: OptimizerInfo) -> str:
    extras = [f"{k}={v}" for k, v in info.kwargs.items() if k not in BASE]
    return info.name + ("[" + ",".join(extras) + "]" if extras else "")
