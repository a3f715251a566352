"""Counter-based randomness: every random draw of a basis policy comes from ``Draws``, a stream
that is a pure function of ``(seed, parameter key, draw index)`` and of nothing else: not the
device, not the dtype, not torch's generator algorithms.

Nothing random needs to be saved beyond three integers, a resumed run draws exactly what the
uninterrupted one would, on any device, and a draw can be repeated at will (GrassJump regenerates
its basis from its seed instead of storing it).
"""
from __future__ import annotations

import math

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


_MASK32 = 0xFFFFFFFF
#: a draw is at most this many numbers: two 32-bit counters per pair must stay below 2**32
MAX_DRAW = 1 << 31


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 arithmetic that never overflows
    (16-bit halves: each product stays below 2**48). Consumes ``x``."""
    high = (x >> 16).mul_(c).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.bitwise_and_(0xFFFF).mul_(c).add_(high).bitwise_and_(_MASK32)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32" constants) on int64 tensors in [0, 2**32).
    Consumes ``x``."""
    x = _mul32(x.bitwise_xor_(x >> 16), 0x7FEB352D)
    x = _mul32(x.bitwise_xor_(x >> 15), 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


class Draws:
    """The random numbers of one draw ``(seed, parameter key, draw index)``, the same bits on
    every device and in every dtype: counter-based 32-bit hashes computed with integer tensor
    ops on the target device, turned into float64 uniforms (and Gaussians by Box-Muller) and only
    then cast. A GPU and a CPU, or a float32 and a float64 run, draw the same numbers up to the
    last bit of float64 ``log``/``cos``; a basis regenerated after a resume on another device
    type is the same basis (``torch.randn`` streams differ between CPU and CUDA generators and
    between dtypes). Successive calls give independent numbers (a call counter is mixed in).
    """

    def __init__(self, *parts: int):
        self.seed = mix_seed(*parts)
        self.calls = 0

    def _bits(self, count: int, device) -> torch.Tensor:
        if count > MAX_DRAW:
            raise ValueError(f"a random draw of {count:,} numbers is over slimopt's limit of "
                             f"{MAX_DRAW:,} per draw (a basis of d x r with d * r below it works)")
        key = mix_seed(self.seed, self.calls)
        self.calls += 1
        counter = torch.arange(count, dtype=torch.int64, device=device)
        first = _hash32(counter.bitwise_xor_(key & _MASK32))
        return _hash32(first.bitwise_xor_((key >> 32) & _MASK32))

    def uniform(self, count: int, device) -> torch.Tensor:
        """``count`` float64 uniforms in (0, 1)."""
        return (self._bits(count, device).to(torch.float64) + 0.5) / 4294967296.0

    def normal(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A ``rows x cols`` standard Gaussian on ``like``'s device in its dtype."""
        count = rows * cols
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs, like.device)
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
        return z.reshape(-1)[:count].reshape(rows, cols).to(like.dtype)
