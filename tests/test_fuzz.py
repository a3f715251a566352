"""Seeded, bounded fuzzing of every slimopt optimizer class (part of the default suite).

Each case draws hyperparameters (valid, and now and then one invalid value), parameter shapes
(0-D, 1-D, 1xN, Nx1, zero-size, 3-D, matrices; LoRA pairs for AdaPreLoRA), one dtype (float32,
bfloat16, float64, float16) and, per step, per-parameter gradients (normal, zeros, 1e-30,
denormal, 1e17, NaN, Inf, now and then a missing one), over enough steps to span a basis refresh;
now and then a group's lr is set to a bad value between steps, as a scheduler could. A LoRA
pair's gradients are drawn as any loss gives them, ``g_A = s B^T H`` and ``g_B = s H A^T`` for one
random ``H`` of the kinds above (now and then one factor's is missing: refused).
``nonfinite="off"`` gets finite gradients only: it promises nothing for the others.
Every case must end in one of:
- a clear error from slimopt's own checks: ``ValueError``, ``TypeError`` or
  ``FloatingPointError`` raised by a ``raise`` statement in slimopt's source (not a traceback from
  inside torch), and, at a step, before anything changed;
- finite weights and state after every step, unless ``nonfinite="off"`` was fed a non-finite
  gradient (then the case stops there): no NaN from a finite gradient.
An invalid hyperparameter must be refused at construction.
"""
from __future__ import annotations

import linecache
import math
import os
import random
import warnings

import pytest
import torch

import slimopt
from optimizer_registry import assert_unchanged, snapshot
from slimopt.optimizers.core.base import SlimOptimizer

CLASSES = [getattr(slimopt, n) for n in slimopt.__all__
           if isinstance(getattr(slimopt, n), type) and issubclass(getattr(slimopt, n), SlimOptimizer)]
CASES_PER_CLASS = 300
STEPS = 5
SLIMOPT_DIR = os.path.dirname(os.path.abspath(slimopt.__file__))
ALLOWED = (ValueError, TypeError, FloatingPointError)
NAN = float("nan")

# option: (valid values, invalid values)
COMMON = {
    "lr": ([1e-3, 1e-2, 0.1, 1.0], [-0.05, NAN, math.inf, "0.1", True]),
    "weight_decay": ([0.0, 0.1], [-1.0, math.inf]),
    "eps": ([1e-8, 1e-6, 1e-30], [0.0, -1.0, NAN, 1e-50]),
    "betas": ([(0.9, 0.999), (0.0, 0.99), (0.5, 0.9)], [(1.0, 0.9), (0.9,), "ab"]),
    "nonfinite": (["skip", "raise", "off"], ["bogus"]),
}
SUBSPACE = {
    "rank": ([1, 2, 3, 8, None], [0, -1, 2.5, True]),
    "update_interval": ([1, 2, 3], [0, 1.5]),
    "seed": ([0, 7], [-1]),
    "moment_rule": (["keep", "reset", "transport"], ["rotate"]),
}
ADAM = {**SUBSPACE, "scale": ([0.25, 1.0], [0.0]), "recovery": ([True, False], [1]),
        "residual": (["orthogonal", "scaled"], ["none"]), "limiter": ([1.01, 2.0], [0.5])}
SPACES = {
    "GrassWalk": {**ADAM, "walk_angle": ([0.1, 0.5, math.pi / 2], [0.0, NAN, True, 2.0]),
                  "walk_tangent_rank": ([1, "full"], [2]), "walk_init": (["svd", "random"], ["pca"])},
    "GrassJump": ADAM, "SARA": ADAM, "GaLore": ADAM,
    "SNSM": {**SUBSPACE, "subset_norm": ([True, False], ["yes"]),
             "betas": ([(0.9, 0.999), (0.9, 1.0), (0.0, 0.99)], [(1.0, 0.9)])},
    "SubsetNorm": {"subset_size": (["auto", 1, 4, 10 ** 9], [0, "rows"]),
                   "betas": ([(0.9, 0.999), (0.0, 1.0)], [(0.9, 1.5)])},
    "ROOT": {"momentum": ([0.0, 0.9, 0.95], [1.0, NAN]), "nesterov": ([True, False], ["yes"]),
             "percentile": ([0.5, 0.9, 1.0, None], [0.0, 1.5]), "ns_steps": ([1, 5], [0]),
             "coefficients": (["adaptive", "muon", [(3.4445, -4.775, 2.0315)] * 2],
                              [[(NAN, 0.0, 0.0)], [], "polar"]),
             "lr_scale": (["match_rms", "original"], ["rms"]),
             "ns_dtype": (["bfloat16", "float32", "float64"], ["float16"]),
             "ns_eps": ([1e-7, 1e-30], [0.0])},
    "AdaPreLoRA": {"beta1": ([0.0, 0.9], [1.0]), "beta2_decay": ([-0.8, -0.5], [0.5, NAN]),
                   "eps1": ([1e-30, 1e-15], [0.0]), "damping": ([0.0, 1e-6, 1e-3], [-1.0]),
                   "clip_threshold": ([1.0, 0.1, None], [0.0]),
                   "momentum_on": (["gradients", "steps"], ["both"])},
}
SPACES["SubspaceMomentum"] = SPACES["SNSM"]
SHAPES = [(6, 10), (10, 6), (5, 5), (1, 8), (8, 1), (8,), (0, 5), (2, 3, 4), ()]
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16]
GRADS = ["normal"] * 6 + ["zeros", "tiny", "denormal", "huge", "nan", "inf", "none"]


def _draw_options(rng, cls):
    """Options for ``cls``: each option set with probability 1/2, invalid with 1/24 of that."""
    options, invalid = {}, []
    for name, (good, bad) in {**COMMON, **SPACES[cls.__name__]}.items():
        if rng.random() < 0.5:
            continue
        if rng.random() < 1 / 24:
            options[name] = rng.choice(bad)
            invalid.append(name)
        else:
            options[name] = rng.choice(good)
    return options, invalid


def _tensor(rng, shape, dtype):
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    return torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))


def _draw_params(rng, cls, dtype):
    """Parameter groups: plain parameters, or LoRA pairs (and a dense group) for AdaPreLoRA."""
    if cls.__name__ != "AdaPreLoRA":
        return [_tensor(rng, rng.choice(SHAPES), dtype) for _ in range(rng.randint(1, 4))]
    groups = []
    for _ in range(rng.randint(1, 2)):
        r, m, n = rng.choice([1, 2, 4]), rng.choice([1, 5, 8]), rng.choice([1, 5, 8])
        if rng.random() < 0.05:
            r, m, n = rng.choice([(0, 5, 4), (2, 0, 4), (2, 5, 0)])  # an empty side: refused
        A, B = _tensor(rng, (r, n), dtype), _tensor(rng, (m, r), dtype)
        if rng.random() < 0.3:
            B.data.zero_()  # peft's start
        groups.append({"params": [A, B], "lora_scale": rng.choice([0.5, 2.0])})
    if rng.random() < 0.4:
        groups.append({"params": [_tensor(rng, rng.choice(SHAPES), dtype)], "dense": True})
    return groups


def _gradient(kind, p, rng):
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    base = torch.randn(p.shape, generator=g, dtype=torch.float64)
    value = {"normal": base, "zeros": base * 0, "tiny": base * 1e-30, "denormal": base * 1e-42,
             "huge": base * 1e17}.get(kind)
    if value is None:
        value = base.clone()
        if value.numel():
            value.view(-1)[rng.randrange(value.numel())] = NAN if kind == "nan" else math.inf
    return value.to(p.dtype)


def _pair_gradients(rng, kinds, A, B, scale):
    """``(g_A, g_B) = (s B^T H, s H A^T)`` for a random ``H`` (m x n) of a random kind."""
    kind = rng.choice(kinds)
    if kind == "none":
        return None, None
    H = _gradient(kind, torch.empty(B.shape[0], A.shape[1], dtype=torch.float64), rng)
    A64, B64 = A.detach().double(), B.detach().double()
    return (scale * B64.T @ H).to(A.dtype), (scale * H @ A64.T).to(B.dtype)


def _set_gradients(rng, opt):
    """Random gradients of random kinds (finite ones only for ``nonfinite="off"``); whether
    all are finite (or absent)."""
    kinds = GRADS if opt.nonfinite != "off" else [k for k in GRADS if k not in ("nan", "inf")]
    for group in opt.param_groups:
        if type(opt).__name__ == "AdaPreLoRA" and not group["dense"]:
            A, B = group["params"]
            A.grad, B.grad = _pair_gradients(rng, kinds, A, B, group["lora_scale"])
            if A.grad is not None and rng.random() < 0.05:
                rng.choice([A, B]).grad = None  # one factor only: refused
            continue
        for p in group["params"]:
            kind = rng.choice(kinds)
            p.grad = None if kind == "none" else _gradient(kind, p, rng)
    return all(p.grad is None or bool(p.grad.isfinite().all())
               for g in opt.param_groups for p in g["params"])


def _raised_by_slimopt(err) -> bool:
    """The innermost frame is a ``raise`` statement in slimopt's source."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    line = linecache.getline(path, tb.tb_lineno).strip()
    return path.startswith(SLIMOPT_DIR) and line.startswith("raise")


def _all_finite(opt) -> bool:
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    numbers = [v for s in opt.state.values() for v in s.values() if isinstance(v, float)]
    return all(bool(t.isfinite().all()) for t in tensors) and all(map(math.isfinite, numbers))


def _clean_error(err, where):
    assert isinstance(err, ALLOWED) and _raised_by_slimopt(err), \
        f"{where}: not a slimopt check: {type(err).__name__}: {err}"


def _construct(cls, groups, options, invalid, dtype, case):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(groups, **options)
    except Exception as err:  # noqa: BLE001 - every exception is judged here
        _clean_error(err, f"{case}: construction")
        assert invalid or (dtype == torch.float16 and "float16" in str(err)) \
            or "empty side" in str(err), f"{case}: valid options refused: {err}"
        return None
    assert not invalid, f"{case}: invalid {invalid} accepted"
    return opt


def _run_steps(rng, opt, case):
    for t in range(STEPS):
        finite = _set_gradients(rng, opt)
        if rng.random() < 0.04:
            opt.param_groups[-1]["lr"] = rng.choice([-0.05, NAN])  # as a bad scheduler could
        before = snapshot(opt)
        try:
            opt.step()
        except Exception as err:  # noqa: BLE001
            _clean_error(err, f"{case}: step {t}")
            assert_unchanged(opt, before)
            return
        if opt.nonfinite == "off" and not finite:
            return  # NaN in, NaN out: the documented "off"
        assert _all_finite(opt), f"{case}: non-finite weights or state after step {t}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fuzz(cls):
    assert len(CLASSES) == 9
    for i in range(CASES_PER_CLASS):
        rng = random.Random(f"{cls.__name__}-{i}")
        dtype = rng.choice(DTYPES)
        options, invalid = _draw_options(rng, cls)
        groups = _draw_params(rng, cls, dtype)
        case = f"{cls.__name__} case {i} ({dtype}, {options})"
        opt = _construct(cls, groups, options, invalid, dtype, case)
        if opt is not None:
            _run_steps(rng, opt, case)
