"""Counter-based randomness: every random draw comes from a ``torch.Generator`` seeded by a pure
function of ``(seed, parameter key, draw index)``.

Nothing random needs to be saved beyond three integers, a resumed run draws exactly what the
uninterrupted one would, and a draw can be repeated at will (GrassJump regenerates its basis from
its seed instead of storing it).
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (order matters)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def generator_for(device: torch.device, *parts: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded by ``mix_seed(*parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(*parts))
    return gen
