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
_TWO_TO_MINUS_32 = 2.0 ** -32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``: a constant ``c >= 2**31`` is replaced by its
    signed twin ``c - 2**32`` (same residue), so the int64 product stays within ``(-2**63, 2**63)``
    and never overflows; masking its two's complement keeps the low 32 bits. Consumes ``x``."""
    return x.mul_(c - (1 << 32) if c >> 31 else c).bitwise_and_(_MASK32)


def _xorshift(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> torch.Tensor:
    """``x ^ (x >> shift)``, the shifted copy written to ``scratch``. Consumes ``x``."""
    return x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))


def _lowbias32_middle(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Wellons' "lowbias32" 32-bit hash without its first and last ``xorshift(16)``, on int64
    tensors in [0, 2**32). Consumes ``x``."""
    return _mul32(_xorshift(_mul32(x, 0x7FEB352D), 15, scratch), 0x846CA68B)


def _first_xorshift(count: int, low: int, device) -> torch.Tensor:
    """``xorshift(counter ^ low, 16)`` for ``counter`` in ``range(count)``, as an xor table of
    rows ``r`` and columns ``c < 256`` (faster than ``arange``): ``counter = 256 r ^ c``, and
    ``xorshift(16)`` is linear and leaves ``c < 2**16`` unchanged, so the value is
    ``xorshift(256 r ^ low, 16) ^ c``."""
    rows = torch.arange(0, count, 256, dtype=torch.int64, device=device).bitwise_xor_(low)
    rows.bitwise_xor_(rows >> 16)
    table = torch.empty(len(rows), 256, dtype=torch.int64, device=device)
    columns = torch.arange(256, dtype=torch.int64, device=device)
    return torch.bitwise_xor(rows[:, None], columns, out=table).view(-1)[:count]


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

    def _hashes(self, count: int, device, scratch: torch.Tensor) -> torch.Tensor:
        """The next ``count`` 32-bit hashes as int64 in [0, 2**32) (a new tensor); ``scratch``
        (``count`` int64) holds the shifted copies."""
        if count > MAX_DRAW:
            raise ValueError(f"a random draw of {count:,} numbers is over slimopt's limit of "
                             f"{MAX_DRAW:,} per draw (a basis of d x r with d * r below it works)")
        key = mix_seed(self.seed, self.calls)
        self.calls += 1
        low, high = key & _MASK32, (key >> 32) & _MASK32
        x = _lowbias32_middle(_first_xorshift(count, low, device), scratch)
        # lowbias32(lowbias32(counter ^ low) ^ high): the xorshift(16) that ends the first hash
        # and the one that starts the second fold into one xor, as xorshift(16) is linear and
        # its own inverse on 32 bits
        x = _lowbias32_middle(x.bitwise_xor_(high ^ (high >> 16)), scratch)
        return _xorshift(x, 16, scratch)

    def _halves(self, count: int, device) -> torch.Tensor:
        """The next ``count`` 32-bit hashes ``h`` as float64 ``h + 0.5``, in (0, 2**32)."""
        out = torch.empty(count, dtype=torch.float64, device=device)
        # the output's memory holds the shifted copies until the result goes there
        return out.copy_(self._hashes(count, device, out.view(torch.int64))).add_(0.5)

    def bits(self, count: int, device) -> torch.Tensor:
        """The next ``count`` 32-bit hashes, int64 in [0, 2**32): random bits on their own (the
        stochastic rounding of low-precision states takes 16 of each)."""
        return self._hashes(count, device, torch.empty(count, dtype=torch.int64, device=device))

    def uniform(self, count: int, device) -> torch.Tensor:
        """``count`` float64 uniforms in (0, 1)."""
        return self._halves(count, device).mul_(_TWO_TO_MINUS_32)

    def normal(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A ``rows x cols`` standard Gaussian on ``like``'s device in its dtype."""
        count = rows * cols
        pairs = (count + 1) // 2
        u = self._halves(2 * pairs, like.device)
        # (2 pi) * (u * 2**-32) == u * (2 pi * 2**-32) exactly: scaling by 2**-32 is exact
        radius = u[:pairs].mul_(_TWO_TO_MINUS_32).log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi * _TWO_TO_MINUS_32)
        cos = torch.cos(angle)
        z = torch.empty(pairs, 2, dtype=torch.float64, device=like.device)
        torch.mul(radius, cos, out=z[:, 0])  # (radius cos, radius sin) pairs, interleaved
        torch.mul(radius, angle.sin_(), out=z[:, 1])
        return z.reshape(-1)[:count].reshape(rows, cols).to(like.dtype)
