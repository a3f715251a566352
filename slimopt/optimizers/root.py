"""ROOT (arXiv 2511.20626): robust orthogonalized momentum.

Per 2-D parameter (m x n) not in a dense group:

1. Nesterov momentum in torch Muon's EMA convention: ``B <- mu B + (1 - mu) G``,
   ``U = (1 - mu) G + mu B`` (the paper's ``M <- mu M + G``, ``U = G + mu M`` is the same up to
   the factor ``1 - mu``, which steps 2-3 are invariant to).
2. Outlier suppression (the proximal step): ``eps`` = the ``percentile`` quantile of ``|U|``
   over the whole matrix (``torch.kthvalue``: the ``ceil(q * numel)``-th smallest, no size
   limit unlike ``torch.quantile``); the robust part ``B = clamp(U, -eps, eps)`` is kept and the
   outliers ``O = U - B`` (the soft-threshold ``T_eps(U)``) are dropped. ``percentile=None``
   switches it off.
3. Newton-Schulz orthogonalization of ``B`` (``slimopt.kernels.newton_schulz``) with
   shape-specific coefficients (``coefficients="adaptive"``: ours fitted per LLaMA shape, else
   the paper's released table, else Muon's; ``"muon"``: Muon's fixed ones; or an explicit list of
   ``(a, b, c)`` per step), computed in ``ns_dtype`` ("bfloat16" as Muon, "float32", "float64").
4. ``W <- W (1 - lr wd) - lr * s * X`` with ``s = 0.2 sqrt(max(m, n))`` (``lr_scale="match_rms"``,
   Moonlight's RMS matching, so one lr serves both this and AdamW) or Keller Jordan's
   ``sqrt(max(1, m/n))`` (``lr_scale="original"``).

Embeddings, lm_head, norms and biases (dense groups, every non-2-D parameter and empty matrices)
get AdamW with ``betas`` (0.9, 0.95 by default) and ``eps``. float16 matrices are taken (the rule
keeps only momentum); float16 parameters that get AdamW are refused, as by every slimopt
optimizer. An update whose squares underflow (entries below ~1e-19) is first scaled by an exact
power of two (``rescale_tiny``), which Newton-Schulz's normalization makes invisible. With
``percentile=None``, ``coefficients="muon"`` and ``lr_scale="match_rms"`` the update equals
``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``'s (tested).
"""
from __future__ import annotations

import math

import torch

from ..kernels import MUON_COEFFICIENTS, newton_schulz
from ..kernels.ns_coefficients import coefficients_for
from .core import SlimOptimizer, state_precision
from .core.adam import decoupled_weight_decay_
from .core.validation import check_choice, check_eps, check_int, is_finite_real

LR_SCALES = ("match_rms", "original")


def outlier_threshold(update: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile`` quantile of ``|update|`` (``ceil(q * numel)``-th smallest value)."""
    flat = update.abs().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue is not implemented for every half type
    k = min(flat.numel(), max(1, math.ceil(percentile * flat.numel())))
    return flat.kthvalue(k).values.to(update.dtype)


def suppress_outliers(update: torch.Tensor, percentile: float | None) -> torch.Tensor:
    """The robust part ``clamp(U, -eps, eps)``; ``U - result`` is the soft-thresholded outliers."""
    if percentile is None:
        return update
    eps = outlier_threshold(update, percentile)
    return torch.minimum(torch.maximum(update, -eps), eps)


def coefficients_ok(coeffs) -> bool:
    """A non-empty list of ``(a, b, c)`` triples of finite real numbers."""
    try:
        return len(coeffs) >= 1 and all(len(c) == 3 and all(map(is_finite_real, c))
                                        for c in coeffs)
    except TypeError:
        return False


def rescale_tiny(update: torch.Tensor) -> torch.Tensor:
    """``update`` times a power of two bringing its largest entry into [0.5, 1) when that is
    below 2^-32 (exact, and Newton-Schulz is scale-invariant): squares of entries below ~1e-19
    underflow in float32 and bfloat16, so ``X / max(||X||, eps)`` would not be normalized and the
    iteration would diverge. Otherwise the factors are 1: the same bits as before."""
    amax = update.abs().amax().double()
    shift = torch.where((amax < 2.0 ** -32) & (amax > 0), -torch.frexp(amax).exponent, 0)
    half = torch.div(shift, 2, rounding_mode="floor")  # two factors: 2^149 is no float32
    scale_dtype = torch.float64 if update.dtype == torch.float64 else torch.float32
    factors = [torch.exp2(k.to(scale_dtype)).to(update.dtype) for k in (half, shift - half)]
    return update * factors[0] * factors[1]


def lr_scale_factor(shape, mode: str) -> float:
    rows, cols = shape
    if mode == "match_rms":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class ROOT(SlimOptimizer):
    """Robust orthogonalized momentum for matrices, AdamW for the rest (see the module docstring).

    Defaults follow the paper: ``lr=1e-3``, ``momentum=0.95`` (Nesterov), ``weight_decay=0.1``,
    ``percentile=0.9``, 5 Newton-Schulz steps, AdamW betas (0.9, 0.95).
    """

    argument_docs = {
        "betas": "(beta1, beta2) of the AdamW that dense parameters get, each in [0, 1)",
        "eps": "the AdamW's eps, a finite number >= 1.175e-38 (the smallest normal float32)",
        "momentum": "the matrices' momentum mu (torch Muon's EMA convention), in [0, 1)",
        "nesterov": "Nesterov momentum, True or False",
        "percentile": "the quantile of |U| above which entries are outliers, in (0, 1]; None: no "
                      "outlier suppression",
        "ns_steps": "Newton-Schulz steps, an int >= 1",
        "coefficients": "'adaptive' (per shape), 'muon' (Muon's fixed ones) or a list of (a, b, "
                        "c) triples of finite numbers, one per step",
        "lr_scale": "the matrices' lr factor: 'match_rms' (0.2 sqrt(max(m, n))) or 'original' "
                    "(sqrt(max(1, m/n)))",
        "ns_eps": "Newton-Schulz's normalization eps, a finite number >= 1.175e-38",
        "ns_dtype": "the dtype Newton-Schulz runs in: 'bfloat16', 'float32' or 'float64'",
    }

    #: the matrices' momentum is a moment too (``state_dtype``)
    moment_keys = {**SlimOptimizer.moment_keys, "momentum_buffer": state_precision.SIGNED}

    def __init__(self, params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, *,
                 momentum=0.95, nesterov=True, percentile=0.9, ns_steps=5,
                 coefficients="adaptive", lr_scale="match_rms", ns_eps=1e-7, ns_dtype="bfloat16",
                 maximize=False, nonfinite="skip", state_dtype="float32"):
        super().__init__(params, locals())

    def check_group(self, group):
        mu = group["momentum"]
        if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not 0.0 <= mu < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {mu!r}")
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
        q = group["percentile"]
        if q is not None and (not isinstance(q, (int, float)) or isinstance(q, bool)
                              or not 0.0 < q <= 1.0):
            raise ValueError(f"percentile must be in (0, 1] or None, got {q!r}")
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("lr_scale", group["lr_scale"], LR_SCALES)
        check_eps("ns_eps", group["ns_eps"])
        check_choice("ns_dtype", group["ns_dtype"], ("bfloat16", "float32", "float64"))
        coeffs = group["coefficients"]
        if isinstance(coeffs, str):
            check_choice("coefficients", coeffs, ("adaptive", "muon"))
        elif not coefficients_ok(coeffs):
            raise ValueError("coefficients must be 'adaptive', 'muon' or a list of (a, b, c) "
                             f"triples of finite numbers, one per step; got {coeffs!r}")

    def takes_matrix_rule(self, param, group):
        """Non-empty matrices outside dense groups (an empty one gets AdamW: a no-op)."""
        return param.dim() == 2 and param.numel() > 0 and not group["dense"]

    def takes_float16(self, param, group):
        """The matrix rule keeps only momentum (no squared gradients): safe in float16."""
        return self.takes_matrix_rule(param, group)

    def _init_matrix_state(self, p, group, state):
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def step_coefficients(shape, group):
        """The per-step ``(a, b, c)`` list for a matrix of ``shape``."""
        coeffs, steps = group["coefficients"], group["ns_steps"]
        if coeffs == "muon":
            return [MUON_COEFFICIENTS] * steps
        if coeffs == "adaptive":
            return coefficients_for(shape[0], shape[1], steps)
        return [tuple(c) for c in coeffs]

    def _matrix_step(self, p, group, state):
        mu = group["momentum"]
        buf = state["momentum_buffer"]
        # the buffer's dtype: a float32 work tensor for a half-precision matrix whose momentum
        # is stored in low precision (state_dtype), else the matrix's (a no-op)
        grad = p.grad.to(buf.dtype)
        buf.lerp_(grad, 1.0 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        robust = rescale_tiny(suppress_outliers(update, group["percentile"]))
        ortho = newton_schulz(robust, self.step_coefficients(p.shape, group),
                              eps=group["ns_eps"], dtype=getattr(torch, group["ns_dtype"]))
        state["step"] += 1
        decoupled_weight_decay_(p, group["lr"], group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-group["lr"] * lr_scale_factor(p.shape, group["lr_scale"]))
