"""Where each matrix lives and which rank steps it: the planning of the owner-computes design,
pure and engine-agnostic (no communication, no engine objects), so every rank computes the same
plan and the benchmarks use the same code as the runs.

- ``Slot``: where one parameter lies in a flat partition; ``Holding``: which slice of it a rank
  holds;
- ``assign_owners``: owners balancing sizes (state bytes in ``fsdp.plan``, the planner of both
  the FSDP2 adapter and the ZeRO-1/2/3 bridge);
- ``holders``: who holds which part of a parameter when an engine cuts a flat buffer into
  consecutive shares (ZeRO-1/2);
- ``row_shares``: the elements of a tensor each rank holds when dim 0 is split as FSDP2 splits
  it, where element-wise state stays.
"""
from __future__ import annotations

from typing import NamedTuple


class Slot(NamedTuple):
    """Where one parameter lies in its sub-group's flat fp32 partitions."""
    #: the optimizer's key of the parameter (``SlimOptimizer.param_key``)
    key: int
    #: ZeRO-1/2: its start in the group's flat buffer (all ranks' partitions back to back);
    #: ZeRO-3: the start of its chunk in every rank's partition
    offset: int
    #: its full shape
    shape: tuple
    #: ZeRO-3: elements of each rank's chunk of it, ``ceil(numel / world)``; None at ZeRO-1/2
    chunk: int | None


class Holding(NamedTuple):
    """ZeRO-1/2: the part ``[start, end)`` of the group's flat buffer that rank ``rank``'s
    partition holds of one parameter."""
    rank: int
    start: int
    end: int


def assign_owners(sizes, world: int, load=None) -> list[int]:
    """The owner rank of each unit of ``sizes`` elements: largest first, each to the least loaded
    rank (ties to the lowest rank). ``load`` (one entry per rank, updated in place) carries the
    balance across param groups. Deterministic, so every rank computes the same assignment."""
    load = [0] * world if load is None else load
    owners = [0] * len(sizes)
    for u in sorted(range(len(sizes)), key=lambda u: -sizes[u]):
        owners[u] = min(range(world), key=lambda r: (load[r], r))
        load[owners[u]] += sizes[u]
    return owners


def holders(offset: int, numel: int, size: int, world: int) -> list[Holding]:
    """A ``Holding`` ``(rank, start, end)`` for each rank whose ZeRO-1/2 partition (``size``
    elements of the group's flat buffer, rank ``r`` holding ``[r * size, (r + 1) * size)``) holds
    part of the flat range ``[offset, offset + numel)``."""
    first, last = offset // size, min((offset + numel - 1) // size, world - 1)
    return [Holding(r, max(offset, r * size), min(offset + numel, (r + 1) * size))
            for r in range(first, last + 1)
            if min(offset + numel, (r + 1) * size) > max(offset, r * size)]


def row_shares(shape, world: int) -> list[int]:
    """Elements of a tensor of ``shape`` on each rank when its dim 0 is cut as ``torch.chunk``
    cuts it (FSDP2's ``Shard(0)``): ``ceil(rows / world)`` rows each, the last ranks fewer or
    none. A 0-d tensor is held whole by rank 0."""
    if len(shape) == 0:
        return [1] + [0] * (world - 1)
    rows, rest = shape[0], shape_numel(shape[1:])
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) * rest for r in range(world)]


def shape_numel(shape) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    return n
