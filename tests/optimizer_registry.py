"""The test-only facts of every slimopt optimizer (small options, bad inputs, state size), so the
generic tests run over all of them (the idea of torch's OptimizerInfo). The package facts (class,
parameter split, which suites run it) are the method records (``slimopt.launch.records``): an
optimizer whose record names the generic suite and that is not listed here fails
``tests/test_records.py``. A new optimizer inherits the generic tests by being listed."""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

import slimopt
from slimopt.launch import records
from slimopt.optimizers import ROOT, SNSM, AdaPreLoRA, SubsetNorm, SubspaceMomentum


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
    #: the generic tests that apply (None: all); the others are skipped, naming ``why``
    only: tuple | None = None
    why: str = ""

    @property
    def name(self):
        return self.cls.__name__

    @property
    def method(self) -> records.Method:
        return next(m for m in records.METHODS if m.build is self.cls)

    @property
    def state_dtype(self) -> str:
        return self.kwargs.get("state_dtype", "float32")

    @property
    def lora_pairs(self) -> bool:
        """Built from a model with LoRA adapters (the optimizer finds its pairs)."""
        return self.method.split == records.LORA_PAIRS


UNIVERSAL_BAD = [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=math.inf), "lr"),
    (dict(betas=(1.5, 0.999)), "betas[0]"), (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(betas=0.9), "betas"), (dict(eps=-1.0), "eps"), (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(nonfinite="zero"), "nonfinite"),
]
SUBSPACE_BAD = [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(update_interval=0), "update_interval"), (dict(moment_rule="rotate"), "moment_rule"),
    (dict(seed=-1), "seed"), (dict(stagger_refresh="yes"), "stagger_refresh"),
]
ADAM_BAD = SUBSPACE_BAD + [
    (dict(betas=(0.9, 1.0)), "betas[1]"), (dict(scale=0.0), "scale"),
    (dict(residual="none"), "residual"), (dict(limiter=0.5), "limiter"),
    (dict(recovery="yes"), "recovery"), (dict(compile=1), "compile"),
]
WALK_BAD = ADAM_BAD + [
    (dict(walk_angle=0.0), "walk_angle"), (dict(walk_angle=2.0), "walk_angle"),
    (dict(walk_angle=True), "walk_angle"),
    (dict(walk_tangent_rank=2), "walk_tangent_rank"), (dict(walk_init="pca"), "walk_init"),
]
SNSM_BAD = SUBSPACE_BAD + [(dict(subset_norm="yes"), "subset_norm")]

BASE = dict(lr=1e-2, rank=3, update_interval=3, weight_decay=0.1)
#: the generic tests a LoRA-pair method runs (the others step single matrices)
ONLY_PAIRS = ("test_resume_is_bit_exact", "test_bad_hyperparameters_raise_naming_the_argument",
              "test_method_specific_bad_input", "test_dense_group_is_adamw",
              "test_register_with_torch_optim")


def adam_floats(stores_basis=True, recovery=False):
    """Two r x k moments, the basis if stored, and the limiter's norm (a 0-d float32 tensor)
    with recovery (``kw["recovery"]`` where the case sets it)."""
    def floats(p, kw):
        d, k = _sorted(p)
        return 2 * kw["rank"] * k + (d * kw["rank"] if stores_basis else 0) \
            + int(kw.get("recovery", recovery))
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
    OptimizerInfo(slimopt.GrassJump, dict(BASE, recovery=True), adam_floats(stores_basis=False),
                  ADAM_BAD),
    OptimizerInfo(slimopt.GaLore, dict(BASE, svd="randomized", stagger_refresh=True), adam_floats(),
                  ADAM_BAD + [(dict(svd="lanczos"), "svd")]),
    OptimizerInfo(slimopt.GrassJump, dict(BASE, store_basis=True, stagger_refresh=True),
                  adam_floats(), ADAM_BAD + [(dict(store_basis="yes"), "store_basis")]),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE), adam_floats(recovery=True), WALK_BAD),
    OptimizerInfo(slimopt.GrassWalk, dict(BASE, walk_tangent_rank="full", walk_init="random",
                                          residual="scaled"), adam_floats(recovery=True), WALK_BAD),
    OptimizerInfo(SNSM, dict(BASE), snsm_floats, SNSM_BAD),
    OptimizerInfo(SNSM, dict(BASE, betas=(0.9, 1.0)), snsm_floats, SNSM_BAD, ls_lr=1.0),
    OptimizerInfo(SubspaceMomentum, dict(BASE), sm_floats, SNSM_BAD, ls_lr=1.0),
    OptimizerInfo(SubsetNorm, dict(lr=1e-2, weight_decay=0.1), subset_norm_floats,
                  [(dict(subset_size=0), "subset_size"), (dict(subset_size="rows"), "subset_size"),
                   (dict(rank=4), "unexpected")], group_bad={"subset_size": -1}, subspace=False),
    OptimizerInfo(ROOT, dict(lr=1e-2, weight_decay=0.1), lambda p, kw: p.numel(),
                  [(dict(percentile=2.0), "percentile"), (dict(ns_steps=0), "ns_steps"),
                   (dict(coefficients=[(math.nan, 0.0, 0.0)]), "coefficients"),
                   (dict(ns_eps=0.0), "ns_eps")],
                  group_bad={"momentum": 2.0}, subspace=False, ls_lr=0.05),
    OptimizerInfo(ROOT, dict(lr=1e-2, weight_decay=0.1, percentile=None, coefficients="muon",
                             nesterov=False), lambda p, kw: p.numel(), [],
                  group_bad={"momentum": 2.0}, subspace=False, ls_lr=0.05),
    OptimizerInfo(AdaPreLoRA, dict(lr=1e-2, weight_decay=0.1), None,
                  [(dict(beta1=1.0), "beta1"), (dict(damping=-1.0), "damping"),
                   (dict(statistics="full"), "statistics"), (dict(eps1=0.0), "eps1")],
                  group_bad={"beta1": 2.0}, subspace=False, only=ONLY_PAIRS,
                  why="a per-parameter test; LoRA pairs: tests/test_adaprelora.py"),
]

#: the generic tests a low-precision entry runs: those the stored moments change (the AdamW
#: twins, equal to float rounding, are replaced by tests/test_state_dtype.py's comparison within
#: the states' quantization error; the bad-input tests do not depend on the states)
LOW_PRECISION_TESTS = ("test_resume_is_bit_exact", "test_state_bytes_counts_every_tensor",
                       "test_init_state_on_meta_device",
                       "test_nonfinite_gradient_skips_that_parameter",
                       "test_param_groups_keep_their_own_hyperparameters")


def low_precision(info: OptimizerInfo, state_dtype: str) -> OptimizerInfo:
    """``info`` with its moments stored in ``state_dtype``, running ``LOW_PRECISION_TESTS`` (of
    those that apply to ``info``)."""
    only = tuple(t for t in LOW_PRECISION_TESTS if info.only is None or t in info.only)
    return dataclasses.replace(info, kwargs=dict(info.kwargs, state_dtype=state_dtype),
                               only=only, why=f"state_dtype={state_dtype!r} runs {only}")


#: one entry per class (its first configuration), with each low-precision state_dtype
OPTIMIZERS += [low_precision(info, state_dtype) for state_dtype in ("bfloat16", "int8")
               for info in {info.cls: info for info in reversed(OPTIMIZERS)}.values()]

#: the entries whose optimizer takes plain parameters (not LoRA pairs found in a model)
PER_PARAMETER = [info for info in OPTIMIZERS if not info.lora_pairs]


def info_id(info: OptimizerInfo) -> str:
    extras = [f"{k}={v}" for k, v in info.kwargs.items() if k not in BASE]
    return info.name + ("[" + ",".join(extras) + "]" if extras else "")


# ---------------------------------------------------------------------------- state snapshots
def same(a, b) -> bool:
    """Equal values, tensors bit for bit (shape and dtype too), NaN equal to NaN."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def snapshot(opt) -> dict:
    """Everything a step, an added group or a load may change: parameters, weights, state (by
    parameter) and group options."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"params": [id(p) for p in params],
            "weights": [p.detach().clone() for p in params],
            "state": {id(p): copy.deepcopy(s) for p, s in opt.state.items()},
            "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                       for g in opt.param_groups]}


def assert_unchanged(opt, before: dict) -> None:
    assert same(snapshot(opt), before), "the optimizer changed although the call raised"
