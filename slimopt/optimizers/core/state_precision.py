"""Low-precision optimizer states (``state_dtype``) as pure functions: how a moment is stored,
and the codecs between that form and the float32 work tensor a rule updates.

A moment ``key`` (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...) of a parameter is stored
under these names of its state:

- ``"float32"``: ``key``, as every rule keeps it (the parameter's dtype);
- ``"bfloat16"``: ``key + "_bf16"``, 2 bytes per element. Updated in float32 and rounded back
  with **stochastic rounding** (``stochastic_round_bf16``): unbiased, so that the tiny increments
  of an EMA with ``beta`` near 1 are not lost to round-to-nearest. The random bits are a pure
  function of ``(seed, parameter key, step, moment, slice)`` (``rng.Draws``): a resumed run rounds
  exactly as the uninterrupted one;
- ``"int8"``: ``key + "_int8"`` (uint8 codes, the moment's shape) and ``key + "_absmax"`` (one
  float32 scale per block of ``BLOCK`` = 256 consecutive elements of the flattened moment):
  bitsandbytes' block-wise dynamic quantization (Dettmers et al., "8-bit Optimizers via
  Block-wise Quantization"), the signed dynamic map for a moment that may be negative, the
  unsigned one for a non-negative one (second moments), as bitsandbytes' 8-bit Adam does;
  1 + 4/256 bytes per element. Rounding is deterministic, to the nearest code but for ~0.2% of
  values where bitsandbytes' CPU search takes a neighbour of it (the error stays within about
  half the map's largest gap times the block's absmax: 0.7% of it for the signed map, 0.35% for
  the unsigned one; ``tests/test_state_dtype.py``).

Only moments of two or more dimensions with at least one element are stored in low precision
(``kept_low``); 1-D moments (norms, biases: a negligible share of the bytes, and the tensors
bitsandbytes' 8-bit Adam also keeps in 32 bits) stay as they are. Plain tensors only (no tensor
subclass, no ``QuantState``), so that ``torch.load(weights_only=True)`` reads a checkpoint.
"""
from __future__ import annotations

import logging
import math
import sys

import torch

from .rng import Draws
from .validation import check_choice

STATE_DTYPES = ("float32", "bfloat16", "int8")
#: elements per int8 scale (bitsandbytes' 8-bit optimizers use 256 too)
BLOCK = 256
#: elements per stochastic-rounding draw (bounds the transient integer tensors of a rounding)
ROUND_SLICE = 1 << 20
#: what a moment's values may be: the int8 map they get
SIGNED, NONNEGATIVE = "signed", "nonnegative"
#: the parts that tell a rounding's draws from a basis's (``Draws(seed, key, interval)``)
_ROUNDING_STREAM = 0x5EED_B16
INSTALL_ADVICE = "pip install bitsandbytes"


def check_state_dtype(value) -> None:
    """``value`` is one of ``STATE_DTYPES``; for ``"int8"``, bitsandbytes is importable."""
    check_choice("state_dtype", value, STATE_DTYPES)
    if value == "int8":
        bitsandbytes_functional()


def bitsandbytes_functional():
    """``bitsandbytes.functional``, imported on first use; ``ImportError`` naming the install
    command when it is missing. Its CPU backend logs a warning about optional 'kernels' at import
    (a 4-bit matmul slimopt does not use): silenced for that import. Called at every int8
    encode and decode: once imported, the module is returned at once (no logger work on the
    step's path)."""
    imported = sys.modules.get("bitsandbytes.functional")
    if imported is not None:
        return imported
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    except ImportError as err:
        raise ImportError(f"state_dtype='int8' quantizes the optimizer's moments with "
                          f"bitsandbytes' block-wise quantization, which is not installed "
                          f"({err}): {INSTALL_ADVICE}, or use state_dtype='bfloat16' or "
                          "'float32'") from None
    finally:
        noisy.setLevel(level)
    return functional


def stored_names(key: str, state_dtype: str) -> tuple[str, ...]:
    """The state entries that hold moment ``key`` stored in ``state_dtype``."""
    if state_dtype == "bfloat16":
        return (key + "_bf16",)
    if state_dtype == "int8":
        return (key + "_int8", key + "_absmax")
    return (key,)


def kept_low(shape, state_dtype: str) -> bool:
    """Whether a moment of ``shape`` is stored in ``state_dtype`` (else as float32 rules keep
    it): two or more dimensions and at least one element."""
    return state_dtype != "float32" and len(shape) >= 2 and math.prod(shape) > 0


def zeros(key: str, shape, device, state_dtype: str) -> dict:
    """The stored form of a zero moment ``key`` of ``shape`` (also on the meta device). A zero
    int8 block has scale 0, so every code decodes to 0."""
    if state_dtype == "bfloat16":
        return {key + "_bf16": torch.zeros(shape, dtype=torch.bfloat16, device=device)}
    blocks = -(-math.prod(shape) // BLOCK)
    return {key + "_int8": torch.zeros(shape, dtype=torch.uint8, device=device),
            key + "_absmax": torch.zeros(blocks, dtype=torch.float32, device=device)}


def decode(state: dict, key: str, state_dtype: str, sign: str, dtype: torch.dtype,
           start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Elements ``[start, stop)`` of the flattened moment ``key`` stored in ``state`` as a new
    flat tensor of ``dtype`` (float32 or float64); for int8, ``start`` is a multiple of
    ``BLOCK``."""
    if state_dtype == "bfloat16":
        return state[key + "_bf16"].reshape(-1)[start:stop].to(dtype, copy=True)
    codes = state[key + "_int8"].reshape(-1)[start:stop]
    absmax = state[key + "_absmax"][start // BLOCK:start // BLOCK + -(-codes.numel() // BLOCK)]
    return dequantize_int8(codes, absmax, sign).to(dtype)


def encode_(state: dict, key: str, state_dtype: str, sign: str, values: torch.Tensor,
            rounding: tuple, start: int = 0) -> None:
    """Store ``values`` (float32/float64, any shape) as elements ``[start, start + numel)`` of the
    flattened moment ``key`` of ``state``, in place. ``rounding``: the integers the stochastic
    rounding's draws are seeded with (``(seed, parameter key, step, moment index)``); ``start``
    is a multiple of ``ROUND_SLICE`` (bfloat16) or ``BLOCK`` (int8) unless it is 0."""
    flat = values.reshape(-1)
    if start % (ROUND_SLICE if state_dtype == "bfloat16" else BLOCK):
        raise ValueError(f"a {state_dtype} moment is encoded from a multiple of "
                         f"{ROUND_SLICE if state_dtype == 'bfloat16' else BLOCK} elements, got "
                         f"{start}")
    if state_dtype == "bfloat16":
        target = state[key + "_bf16"].view(-1)[start:start + flat.numel()]
        target.copy_(stochastic_round_bf16(flat, rounding, start))
        return
    codes, absmax = quantize_int8(flat, sign)
    state[key + "_int8"].view(-1)[start:start + flat.numel()].copy_(codes)
    state[key + "_absmax"][start // BLOCK:start // BLOCK + absmax.numel()].copy_(absmax)


# ---------------------------------------------------------------------------- bfloat16
def stochastic_round_bf16(values: torch.Tensor, rounding: tuple, offset: int = 0) -> torch.Tensor:
    """``values`` (flat, float32 or float64; float64 is first rounded to float32) rounded to
    bfloat16 stochastically: up to the next bfloat16 with probability equal to the fraction of
    the gap below ``values``, so the expected result is ``values`` (in float32). The 16 dropped
    bits get 16 random bits added before truncation; the bits of slice ``j`` (``ROUND_SLICE``
    elements from ``offset``, each hash giving two elements 16 bits each) come from
    ``Draws(*rounding, stream, j)``. Infinities and NaNs stay as they are; a finite value within
    one bfloat16 gap of the largest may round to infinity, as round-to-nearest would past it."""
    x = values.reshape(-1).to(torch.float32)
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=x.device)
    for start in range(0, x.numel(), ROUND_SLICE):
        piece = x[start:start + ROUND_SLICE]
        n = piece.numel()
        hashes = Draws(*rounding, _ROUNDING_STREAM, (offset + start) // ROUND_SLICE).bits(
            (n + 1) // 2, x.device)
        noise = torch.cat([hashes.bitwise_and(0xFFFF), hashes.bitwise_right_shift_(16)])[:n]
        raw = piece.view(torch.int32) + noise.to(torch.int32)
        special = ~torch.isfinite(piece)  # infinities and NaNs keep their bits
        raw = torch.where(special, piece.view(torch.int32), raw.bitwise_and_(-65536))
        out[start:start + n] = raw.view(torch.float32)  # exact: the low 16 bits are 0
    return out.view(values.shape)


# ---------------------------------------------------------------------------- int8
_MAPS: dict = {}


def dynamic_map(sign: str, device) -> torch.Tensor:
    """bitsandbytes' 256-value dynamic map (signed, or unsigned for non-negative values) on
    ``device``, built once per device."""
    key = (sign, str(device))
    if key not in _MAPS:
        functional = bitsandbytes_functional()
        _MAPS[key] = functional.create_dynamic_map(signed=sign == SIGNED).to(device)
    return _MAPS[key]


def quantize_int8(values: torch.Tensor, sign: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of ``values`` (float32 or float64, quantized from float32):
    bitsandbytes' block-wise quantization with blocks of ``BLOCK`` elements of the flattened
    tensor; ``codes`` (uint8) has ``values``' shape, ``absmax`` (float32) one scale per block."""
    x = values.to(torch.float32)
    functional = bitsandbytes_functional()
    codes, quant_state = functional.quantize_blockwise(x, code=dynamic_map(sign, x.device),
                                                       blocksize=BLOCK)
    return codes, quant_state.absmax


def dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor, sign: str) -> torch.Tensor:
    """float32 values of ``codes`` (uint8) with their block scales ``absmax``."""
    functional = bitsandbytes_functional()
    return functional.dequantize_blockwise(codes, absmax=absmax,
                                           code=dynamic_map(sign, codes.device), blocksize=BLOCK)
