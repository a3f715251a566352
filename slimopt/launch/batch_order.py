"""The order in which a run reads its training blocks: batch ``i`` is ``batch_size`` blocks at
positions ``[(i mod E) * batch_size, ...)`` of a seeded permutation of the blocks drawn anew each
epoch (``E`` whole batches per epoch; the last partial batch of an epoch is skipped). It is a pure
function of ``(seed, i)``, so a checkpoint's data position is its step, and a resumed run
neither repeats nor skips a batch.

The permutation takes O(1) memory and O(batch) time per batch, whatever the number of blocks: a
keyed Feistel network (``ROUNDS`` rounds, a splitmix64 round function, keys from SHA-512 of seed
and epoch) permutes ``[0, 4**h)``, the smallest such range that holds ``[0, n)``, and cycle
walking (apply it again until the value lands below ``n``; under 4 times on average) restricts
it to a permutation of ``[0, n)``. A ``torch.randperm`` of the blocks would hold 8 bytes per block
(2 GB for the 65 billion tokens of 256M blocks of 256) and cost O(n) to draw.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .data import DataError

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on ``uint64`` values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def round_keys(seed: int, epoch: int) -> np.ndarray:
    """The ``ROUNDS`` keys of ``(seed, epoch)``'s permutation."""
    digest = hashlib.sha512(f"slimopt-batch-order:{seed}:{epoch}".encode()).digest()
    return np.frombuffer(digest, dtype=np.uint64)[:ROUNDS].copy()


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << shift) | right


def permute(indices, n: int, keys: np.ndarray) -> np.ndarray:
    """Where the keyed permutation of ``[0, n)`` sends each of ``indices`` (``int64``)."""
    indices = np.asarray(indices, dtype=np.int64)
    if n < 1 or (indices.size and (indices.min() < 0 or indices.max() >= n)):
        raise ValueError(f"indices must lie in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    out = indices.astype(np.uint64)
    pending, values = np.arange(out.size), out.copy()
    while pending.size:  # cycle walking: each value's cycle passes below n again
        values = _feistel(values, half, keys)
        landed = values < np.uint64(n)
        out[pending[landed]] = values[landed]
        pending, values = pending[~landed], values[~landed]
    return out.astype(np.int64)


def batch_blocks(n_blocks: int, index: int, batch_size: int, seed: int) -> np.ndarray:
    """The block numbers of global batch ``index``."""
    per_epoch = n_blocks // batch_size
    if per_epoch == 0:
        raise DataError(f"{n_blocks} training blocks is fewer than one batch of {batch_size}")
    epoch, within = divmod(index, per_epoch)
    positions = np.arange(within * batch_size, (within + 1) * batch_size)
    return permute(positions, n_blocks, round_keys(seed, epoch))


def batch_at(blocks, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch number ``index`` of the run: ``(batch_size, seq_len)`` ``int64`` tokens of
    ``blocks`` (a ``token_shards.TokenBlocks``)."""
    return blocks.rows(batch_blocks(len(blocks), index, batch_size, seed))
