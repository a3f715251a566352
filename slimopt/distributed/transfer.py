"""Bringing a matrix whole to its owner rank and sending the result back: the communication of
the owner-computes design, engine-agnostic.

Both engines leave each rank an even, contiguous piece of every flattened matrix (DeepSpeed
ZeRO-3: ``ceil(numel / world)`` elements; FSDP2: ``ceil(rows / world)`` rows, torch.chunk's split
of dim 0), the last pieces padded. So one matrix is a ``(world, chunk)`` table: ``gather_to`` builds
it on the owner (a rooted ``gather``: each rank sends ``chunk`` elements), the owner steps the
whole matrix with the single-process code, and ``scatter_from`` returns each rank its row.
``whole`` and ``table_of`` convert between the table and the full-size matrix. ``all_to_all``
moves one piece of each of ``world`` matrices, each to its own owner, in one collective (the
round-based exchange Dion's distributed Muon uses), for engines that step many matrices at once.

``Transfer`` counts the elements each rank passes to each collective, for the README's
communication per step.
"""
from __future__ import annotations

import torch

from .owners import shape_numel


def whole(table: torch.Tensor, shape) -> torch.Tensor:
    """The full-size matrix of ``shape`` held by a ``(world, chunk)`` table (padding dropped)."""
    return table.reshape(-1)[:shape_numel(shape)].view(shape)


def table_of(values: torch.Tensor, world: int, chunk: int) -> torch.Tensor:
    """The inverse of ``whole``: a new ``(world, chunk)`` table of ``values``, zero padded."""
    table = torch.zeros(world * chunk, dtype=values.dtype, device=values.device)
    table[:values.numel()].copy_(values.reshape(-1))
    return table.view(world, chunk)


def padded(local: torch.Tensor, chunk: int) -> torch.Tensor:
    """This rank's piece, flattened and zero padded to ``chunk`` elements (a view when it is
    already that long and contiguous)."""
    flat = local.reshape(-1)
    if flat.numel() == chunk:
        return flat.contiguous()
    out = torch.zeros(chunk, dtype=local.dtype, device=local.device)
    out[:flat.numel()].copy_(flat)
    return out


def release(shadow: torch.Tensor) -> None:
    """Free the storage a stepped whole matrix's handle held (its values and gradient); the
    handle itself stays, as the key of the matrix's state."""
    shadow.grad = None
    shadow.data = torch.empty(0, dtype=shadow.dtype, device=shadow.device)


class Transfer:
    """The collectives of one process group, with a count of what each rank passed to each of
    them (``communicated``: elements for ``"gather"`` and ``"scatter"``, bytes for
    ``"all_to_all_bytes"``, this rank's own piece included)."""

    def __init__(self, process_group):
        import torch.distributed as dist
        self.dist = dist
        self.group = process_group
        self.rank = dist.get_rank(group=process_group)
        self.world = dist.get_world_size(group=process_group)
        self.communicated: dict[str, int] = {}

    def _count(self, name: str, n: int) -> None:
        self.communicated[name] = self.communicated.get(name, 0) + n

    def global_rank(self, group_rank: int) -> int:
        return self.dist.get_global_rank(self.group, group_rank)

    def gather_to(self, local: torch.Tensor, owner: int) -> torch.Tensor | None:
        """``(world, n)`` table of every rank's ``local`` (``n`` elements each) on ``owner``;
        None elsewhere."""
        self._count("gather", local.numel())
        if self.world == 1:
            return local.reshape(1, -1)
        rows = ([torch.empty_like(local) for _ in range(self.world)]
                if owner == self.rank else None)
        self.dist.gather(local.contiguous(), rows, dst=self.global_rank(owner), group=self.group)
        return torch.stack(rows) if rows is not None else None

    def scatter_from(self, table: torch.Tensor | None, out: torch.Tensor, owner: int) -> None:
        """Row ``r`` of ``owner``'s ``(world, n)`` ``table`` into rank ``r``'s ``out`` (``n``
        elements)."""
        self._count("scatter", out.numel())
        if self.world == 1:
            out.copy_(table.reshape(out.shape))
            return
        received = torch.empty_like(out)
        rows = list(table.unbind(0)) if table is not None else None
        self.dist.scatter(received, rows, src=self.global_rank(owner), group=self.group)
        out.copy_(received)

    def all_to_all(self, outgoing: list, incoming_bytes: list) -> list:
        """Rank ``r`` gets ``outgoing[r]`` (a 1-D uint8 tensor, maybe empty); returns what every
        rank sent this one, ``incoming_bytes[r]`` bytes from rank ``r``. One collective however
        many matrices travel (``all_to_all_single``), so a round of ``world`` matrices, one per
        owner, costs one latency instead of ``world``."""
        self._count("all_to_all_bytes", sum(t.numel() for t in outgoing))
        if self.world == 1:
            return [outgoing[0]]
        device = outgoing[0].device
        received = torch.empty(sum(incoming_bytes), dtype=torch.uint8, device=device)
        self.dist.all_to_all_single(received, torch.cat(outgoing), list(incoming_bytes),
                                    [t.numel() for t in outgoing], group=self.group)
        return list(received.split(list(incoming_bytes)))

    def agree_all(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise AND of the boolean ``flags`` over the ranks (one all-reduce)."""
        if self.world == 1:
            return flags
        values = flags.to(torch.float32)
        self.dist.all_reduce(values, op=self.dist.ReduceOp.MIN, group=self.group)
        return values > 0
