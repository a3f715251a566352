"""Shape-specific quintic Newton-Schulz coefficients for ROOT (arXiv 2511.20626): the tables and
the lookup ROOT uses at run time.

Newton-Schulz normalizes ``X_0 = M / ||M||_F`` (transposed so that rows <= cols) and runs
``X <- a X + b (X X^T) X + c (X X^T)^2 X``: every singular value goes through
``s <- p(s) = a s + b s^3 + c s^5``. After Frobenius normalization the spread of the singular
values depends on the aspect ratio, so the best triple depends on the shape. ROOT ships a table
for four shapes (:data:`ROOT_RELEASED`) without saying how it was fitted; :data:`FITTED` is ours,
one triple per LLaMA projection shape, fitted for :data:`FITTED_STEPS` steps by
``python -m slimopt.kernels.fit_ns_coefficients`` (that module documents the error measure, the
fitting procedure and the caveats). Every fitted triple is stable: the iterates of every ``s`` in
(0, 1] stay in (0, 1.3] for any number of steps. ROOT's released 2048 x 2048 triple is not (a
normalized singular value near 0.56 reaches 3.3 after 5 steps); :data:`FITTED` has that shape, so
the lookup never returns it.

Lookup rule (:func:`coefficients_for`): the shape is canonicalized to ``(min(m, n), max(m, n))``;
then :data:`FITTED` if it has the shape, else :data:`ROOT_RELEASED`, else Muon's
``(3.4445, -4.7750, 2.0315)``; the triple is repeated for every step. Other step counts than
:data:`FITTED_STEPS` stay bounded (the triples are stable) but are not what the triples were
optimized for.
"""
from __future__ import annotations

from .newton_schulz import MUON_COEFFICIENTS

Triple = tuple[float, float, float]
Shape = tuple[int, int]

#: The number of Newton-Schulz steps :data:`FITTED` was optimized for.
FITTED_STEPS = 5

#: ROOT's released table (huawei-noah/noah-research, ROOT), keyed by (rows, cols), rows <= cols.
ROOT_RELEASED: dict[Shape, Triple] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}

#: Our fit, keyed by (rows, cols), rows <= cols: the LLaMA projection shapes we ship (d x d
#: attention, d x ffn MLP) and the tiny-LLaMA test shapes (64 x 64, 64 x 160). Exactly what
#: ``python -m slimopt.kernels.fit_ns_coefficients`` prints.
FITTED: dict[Shape, Triple] = {
    (64, 64): (2.6627, -2.7826, 1.1201),
    (64, 160): (2.4068, -2.2644, 0.8578),
    (512, 512): (3.3917, -4.6521, 2.0675),
    (512, 1376): (3.3946, -4.6380, 2.0515),
    (768, 768): (3.4295, -4.9642, 2.3010),
    (768, 2048): (3.4324, -4.8646, 2.2059),
    (1024, 1024): (3.4399, -5.0879, 2.4020),
    (1024, 2736): (3.4405, -5.0282, 2.3452),
    (2048, 2048): (3.4604, -5.1981, 2.4765),
    (2048, 5461): (3.4611, -5.0885, 2.3724),
    (4096, 4096): (3.4939, -5.0003, 2.2468),
    (4096, 11008): (3.4926, -5.1282, 2.3648),
}


def canonical_shape(rows: int, cols: int) -> Shape:
    """``(min, max)``: Newton-Schulz transposes tall matrices, so a shape and its transpose
    share coefficients."""
    rows, cols = int(rows), int(cols)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"shape must be positive, got ({rows}, {cols})")
    return (rows, cols) if rows <= cols else (cols, rows)


def coefficients_for(rows: int, cols: int, steps: int = FITTED_STEPS) -> list[Triple]:
    """Per-step ``(a, b, c)`` for an ``rows x cols`` matrix: ``steps`` copies of one triple.

    Rule: canonicalize to ``(min, max)``; use :data:`FITTED` if it has the shape, else
    :data:`ROOT_RELEASED`, else Muon's fixed coefficients.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    key = canonical_shape(rows, cols)
    if key in FITTED:
        triple = FITTED[key]
    elif key in ROOT_RELEASED:
        triple = ROOT_RELEASED[key]
    else:
        triple = tuple(MUON_COEFFICIENTS)
    return [tuple(float(v) for v in triple)] * steps


def coefficients_source(rows: int, cols: int) -> str:
    """Which table :func:`coefficients_for` uses: ``"fitted"``, ``"root_released"`` or
    ``"muon"``."""
    key = canonical_shape(rows, cols)
    return "fitted" if key in FITTED else "root_released" if key in ROOT_RELEASED else "muon"
