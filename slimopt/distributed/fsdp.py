"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the exact single-process math on DTensor
parameters, attached by the optimizer itself.

A model sharded with ``fully_shard`` has DTensor parameters, each cut along dim 0 across the ranks
of a 1-D device mesh (``placements == (Shard(0),)``). A slimopt optimizer built on them
(``slimopt.GrassWalk(slimopt.param_groups(model, ...))``, no extra call) gets an ``FSDPRouter``:

- **element-wise parameters** (the dense AdamW rule: norms, biases, embeddings in a dense group)
  step on the shard each rank holds, through DTensor's local dispatch: no communication, and their
  state (DTensors of the parameter's layout) is split like the parameter;
- **matrices** (every matrix rule; a LoRA pair is one unit) each have one owner rank, planned once
  by ``plan``: largest state first, each to the rank holding the least state so far, the
  element-wise shares counted first. Per step the matrices travel in rounds of one per owner:
  one ``all_to_all`` brings each owner the pieces of its matrix (values and gradient), each owner
  steps its whole matrix with the single-process code, and a second ``all_to_all`` returns the
  new pieces (``transfer.Transfer.all_to_all``): two collectives per round, ``ceil(units /
  world)`` rounds or so, however the units are spread. The matrix's state
  lives on its owner only, keyed by the DTensor parameter itself; the other ranks hold
  ``{"key": k}`` for it, so ``torch.distributed.checkpoint`` finds an entry for every parameter;
- **non-finite gradients**: every rank's flags are combined (one all-reduce per group), so a
  NaN in one rank's shard skips (or raises for) the whole parameter on every rank, as in one
  process.

Refused at construction, naming what works: a device mesh of more than one dimension (HSDP,
FSDP + tensor parallel), placements other than ``(Shard(0),)`` (tensor parallel), parameters
offloaded to the CPU by FSDP2's ``CPUOffloadPolicy``, and DTensor and plain parameters mixed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..optimizers.core import state_checks
from ..optimizers.core.validation import is_dtensor
from .owners import assign_owners, row_shares
from .transfer import Transfer, padded, release, table_of, whole

SUPPORTED = ("supported: torch.distributed.fsdp.fully_shard on a 1-D device mesh (every "
             "parameter a DTensor placed (Shard(0),)), DeepSpeed ZeRO-0/1/2/3 through "
             "slimopt.launch.initialize, DDP, and one process")


class Plan(NamedTuple):
    """Where the optimizer state lives at a world size (``plan``)."""
    #: the matrix units (lists of parameters stepped together), in planning order
    units: list
    #: the owner rank of each unit
    owners: list
    #: state bytes on each rank: its shares of the element-wise states plus the owned units'
    per_rank: list


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def units_of(optimizer, group: dict) -> tuple[list, list]:
    """``group``'s element-wise parameters and its matrix units (a LoRA pair group,
    ``zero_unit="group"``, is one unit; otherwise one unit per matrix)."""
    matrices = [p for p in group["params"] if optimizer.takes_matrix_rule(p, group)]
    dense = [p for p in group["params"] if not optimizer.takes_matrix_rule(p, group)]
    if group.get("zero_unit") == "group":
        return dense, [matrices] if matrices else []
    return dense, [[p] for p in matrices]


def plan(optimizer, world: int, groups=None, shares=None) -> Plan:
    """The owners of ``optimizer``'s matrix units at ``world`` ranks and the state bytes each rank
    then holds, from the optimizer's own fresh-state shapes (``expected_state``: meta tensors, so
    this runs for any model size on any machine, and the benchmarks' per-rank table is this
    function). Deterministic: every rank computes the same plan. ``groups``: plan only these
    (default: all), the load of the others is not counted. ``shares``: ``shares(p)`` is the
    elements of element-wise parameter ``p`` on each rank (default: FSDP2's dim-0 split,
    ``row_shares``; the ZeRO bridge passes DeepSpeed's)."""
    if shares is None:
        def shares(p):
            return row_shares(tuple(p.shape), world)
    load, units, unit_bytes = [0] * world, [], []
    for group in optimizer.param_groups if groups is None else groups:
        states = optimizer.expected_state(group)
        size = {id(p): _tensor_bytes(s) for p, s in zip(group["params"], states)}
        dense, group_units = units_of(optimizer, group)
        for p in dense:
            numel = max(p.numel(), 1)
            for r, share in enumerate(shares(p)):
                load[r] += size[id(p)] * share // numel
        units += group_units
        unit_bytes += [sum(size[id(p)] for p in unit) for unit in group_units]
    owners = assign_owners(unit_bytes, world, load)
    return Plan(units, owners, load)


def check_layout(params, name: str):
    """The device mesh of ``params`` if they are all FSDP2 DTensors on one 1-D mesh placed
    ``(Shard(0),)``, with their local shards on the mesh's device; else a ``TypeError`` naming
    what is supported."""
    from torch.distributed.tensor import Shard
    sharded = [is_dtensor(p) for p in params]
    if not all(sharded):
        raise TypeError(f"{name}: {sharded.count(True)} of {len(params)} parameters are DTensors "
                        "(FSDP2) and the others plain tensors; give one optimizer the parameters "
                        f"of one fully_shard-ed model ({SUPPORTED})")
    mesh = params[0].device_mesh
    for p in params:
        where = f"a parameter of shape {tuple(p.shape)}"
        if p.device_mesh != mesh:
            raise TypeError(f"{name}: the parameters live on different device meshes ({where}); "
                            f"one mesh per optimizer is supported ({SUPPORTED})")
        if p.device_mesh.ndim != 1:
            raise TypeError(
                f"{name}: {where} lives on a {p.device_mesh.ndim}-D device mesh (HSDP, or FSDP "
                f"with tensor parallel), which is not supported yet ({SUPPORTED})")
        if tuple(p.placements) != (Shard(0),):
            raise TypeError(
                f"{name}: {where} is placed {tuple(p.placements)}; tensor parallel and replicated "
                f"DTensors are not supported: the owner rank would not see the whole matrix "
                f"({SUPPORTED})")
        if p.to_local().device.type != mesh.device_type:
            raise TypeError(
                f"{name}: {where} is held on {p.to_local().device.type} while its mesh is on "
                f"{mesh.device_type} (FSDP2 CPUOffloadPolicy); offload is not supported: keep "
                f"the optimizer state on the device, sharded across ranks ({SUPPORTED})")
    return mesh


class FSDPRouter:
    """Steps a slimopt optimizer's FSDP2 (DTensor) parameters with the single-process math (see
    the module docstring). Attached by ``SlimOptimizer`` at construction."""

    #: the optimizer checks the gradients (``agree`` makes the flags every rank's)
    checks_gradients = False

    def __init__(self, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.mesh = check_layout(params, type(optimizer).__name__)
        self.transfer = Transfer(self.mesh.get_group())
        self.rank, self.world = self.transfer.rank, self.transfer.world
        self.owner: dict[int, int] = {}   # key of each matrix -> owner rank
        self.shadows: dict[int, torch.Tensor] = {}  # key -> the handle of an owned whole matrix
        self.load = [0] * self.world
        self._plan(optimizer, optimizer.param_groups)

    def _plan(self, optimizer, groups) -> None:
        planned = plan(optimizer, self.world, groups)
        planned_load = [a + b for a, b in zip(self.load, planned.per_rank)]
        for unit, owner in zip(planned.units, planned.owners):
            for p in unit:
                self.owner[optimizer.param_key(p)] = owner
        self.load = planned_load

    def add_group(self, optimizer, group) -> None:
        """Plan a group added after construction (its parameters checked like the others)."""
        if not group["params"]:
            return
        check_layout(group["params"], type(optimizer).__name__)
        if group["params"][0].device_mesh != self.mesh:
            raise TypeError(f"{type(optimizer).__name__}: the added group lives on another "
                            f"device mesh ({SUPPORTED})")
        self._plan(optimizer, [group])

    # ------------------------------------------------------------------ step
    @staticmethod
    def routes(group) -> bool:
        return True

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-parameter finiteness of the local shards -> of the whole gradients."""
        return self.transfer.agree_all(flags)

    def owns(self, key: int) -> bool:
        return self.owner[key] == self.rank

    def step_group(self, optimizer, group, finite) -> None:
        dense, units = units_of(optimizer, group)
        dense = [p for p in dense if p.grad is not None]
        if dense:  # element-wise: on the local shards, through DTensor's local dispatch
            optimizer.step_params(dict(group, params=dense), finite)
        units = [u for u in units if all(p.grad is not None for p in u)]
        for keyed in self._rounds(optimizer, units):
            self._step_round(optimizer, group, keyed, finite)

    def _rounds(self, optimizer, units) -> list:
        """The units in rounds of one per owner rank (``None`` where a rank owns no more), each
        rank's largest first, so every round moves ``world`` matrices in one exchange."""
        queues = [[] for _ in range(self.world)]
        for unit in units:
            queues[self.owner[optimizer.param_key(unit[0])]].append(unit)
        for queue in queues:
            queue.sort(key=lambda unit: -sum(p.numel() for p in unit))
        depth = max(len(q) for q in queues)
        return [[q[j] if j < len(q) else None for q in queues] for j in range(depth)]

    def _step_round(self, optimizer, group, round_units, finite) -> None:
        """One round: every rank sends its pieces (values and gradient) of each owner's unit to
        that owner in one ``all_to_all``, each owner steps its unit whole, and a second
        ``all_to_all`` returns the new pieces."""
        mine = round_units[self.rank]
        pieces = [_pieces(unit, self.world, grads=True) for unit in round_units]
        incoming = self.transfer.all_to_all(
            pieces, [_nbytes(mine, self.world, grads=True)] * self.world)
        if mine is not None:
            shadows = self._assemble(optimizer, mine, incoming)
            optimizer.step_params(dict(group, params=shadows),
                                  {s: finite.get(p, True) for s, p in zip(shadows, mine)})
            back = [_tables_row(shadows, self.world, r) for r in range(self.world)]
            for shadow in shadows:
                release(shadow)
        else:
            back = [torch.empty(0, dtype=torch.uint8)] * self.world
        for unit in round_units:
            for p in unit or ():
                if not self.owns(optimizer.param_key(p)) and not optimizer.state[p]:
                    optimizer.state[p]["key"] = optimizer.param_key(p)  # the owner holds it
        returned = self.transfer.all_to_all(
            back, [_nbytes(unit, self.world, grads=False) for unit in round_units])
        for unit, data in zip(round_units, returned):
            if unit is not None:
                _unpack_local(unit, data, self.world)

    def _assemble(self, optimizer, unit, incoming) -> list:
        """The whole matrices of ``unit`` (and their gradients) from every rank's pieces."""
        shadows, offset = [], 0
        for p in unit:
            chunk = _chunk(p, self.world)
            size = chunk * p.element_size()
            rows = [_as(data[offset:offset + 2 * size], p.dtype) for data in incoming]
            values = torch.stack([r[:chunk] for r in rows])
            grads = torch.stack([r[chunk:] for r in rows])
            offset += 2 * size
            shadows.append(self._shadow(optimizer, p, optimizer.param_key(p),
                                        whole(values, p.shape), whole(grads, p.shape)))
        return shadows

    def _shadow(self, optimizer, param, key, values, grad):
        """The handle of owned matrix ``key`` (its state is ``param``'s), holding ``values`` and
        ``grad`` for this step."""
        shadow = self.shadows.get(key)
        if shadow is None:
            shadow = torch.empty(0, dtype=values.dtype, device=values.device)
            self.shadows[key] = shadow
            optimizer.adopt_key(shadow, key, state_of=param)
        shadow.data = values
        shadow.grad = grad
        return shadow

    # ------------------------------------------------------------------ checkpoints
    # state_dict: the optimizer's own (the router has none). Keyed by parameter index, it holds
    # element-wise states as DTensors (this rank's shards), an owned matrix's whole state and
    # ``{"key": k}`` for the others' matrices: what ``torch.distributed.checkpoint.state_dict.
    # get_optimizer_state_dict`` expects.

    def load_state_dict(self, optimizer, state_dict) -> None:
        """Load a state saved at any world size (``torch.distributed.checkpoint``, or one rank's
        ``state_dict()``): each rank keeps the states of the matrices it owns and refuses, before
        changing anything, a state lacking one of them; element-wise states may be DTensors or
        whole tensors (this rank's rows are taken)."""
        name = type(optimizer).__name__
        state_checks.check_format(state_dict, name)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # saved keys (indices, or the names torch.distributed.checkpoint uses) by position
        position = {k: i for i, k in enumerate(
            k for g in state_dict["param_groups"] if isinstance(g, dict)
            for k in g.get("params", []))}
        saved = dict(state_dict["state"])
        matrices = {i for i, p in enumerate(params) if optimizer.param_key(p) in self.owner}
        owned = {i for i in matrices if self.owns(optimizer.param_key(params[i]))}
        by_position = {position.get(k): k for k in saved}
        missing = [i for i in sorted(owned) if not _is_full(saved.get(by_position.get(i)))]
        if saved and missing:
            raise ValueError(
                f"{name}: the state lacks the whole state of parameter {missing[0]} (shape "
                f"{tuple(params[missing[0]].shape)}), which rank {self.rank} owns: this is one "
                "rank's share of a state saved at another world size or with another plan. Save "
                "and load through torch.distributed.checkpoint (get_optimizer_state_dict / "
                "set_optimizer_state_dict), which gives every rank the states it owns")
        for k in list(saved):
            i = position.get(k)
            if i in matrices and i not in owned:
                del saved[k]
            elif i is not None and i < len(params) and i not in matrices:
                saved[k] = {n: _local_rows(v, params[i]) for n, v in saved[k].items()}
        plain = dict(state_dict, state=saved)
        optimizer.check_state_dict(plain)
        torch.optim.Optimizer.load_state_dict(optimizer, plain)
        for i in matrices - owned:
            optimizer.state[params[i]] = {"key": optimizer.param_key(params[i])}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _as(data: torch.Tensor, dtype) -> torch.Tensor:
    """Bytes received back as elements of ``dtype`` (a copy: the buffer's alignment is
    arbitrary)."""
    return data.clone().view(dtype)


def _pieces(unit, world: int, grads: bool) -> torch.Tensor:
    """This rank's padded pieces of ``unit``'s values (and gradients), as bytes."""
    if unit is None:
        return torch.empty(0, dtype=torch.uint8)
    parts = []
    for p in unit:
        chunk = _chunk(p, world)
        parts.append(_bytes(padded(p.to_local(), chunk)))
        if grads:
            parts.append(_bytes(padded(p.grad.to_local(), chunk)))
    return torch.cat(parts)


def _nbytes(unit, world: int, grads: bool) -> int:
    """Bytes of one rank's pieces of ``unit`` (values, and gradients with ``grads``)."""
    if unit is None:
        return 0
    return sum(_chunk(p, world) * p.element_size() for p in unit) * (2 if grads else 1)


def _tables_row(shadows, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s pieces of the new values of the stepped whole matrices, as bytes."""
    return torch.cat([_bytes(table_of(s.data, world, _chunk(s, world))[rank]) for s in shadows])


def _unpack_local(unit, data: torch.Tensor, world: int) -> None:
    """Copy this rank's new pieces of ``unit`` (bytes from its owner) into the local shards."""
    offset = 0
    for p in unit:
        size = _chunk(p, world) * p.element_size()
        local = p.to_local()
        local.view(-1).copy_(_as(data[offset:offset + size], p.dtype)[:local.numel()])
        offset += size


def _is_full(entry) -> bool:
    return isinstance(entry, dict) and any(torch.is_tensor(v) for v in entry.values())


def _local_rows(value, param):
    """An element-wise state value for ``param``: a DTensor as it is; a whole tensor of the
    parameter's shape becomes a DTensor holding this rank's rows."""
    if not torch.is_tensor(value) or is_dtensor(value) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import DTensor
    mesh = param.device_mesh
    chunk = -(-value.shape[0] // mesh.size())
    rank = mesh.get_local_rank()
    local = value[rank * chunk:(rank + 1) * chunk].to(param.to_local().device).contiguous()
    return DTensor.from_local(local, mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _chunk(p, world: int) -> int:
    """Elements of each rank's padded piece of ``p`` (``ceil(rows / world)`` rows)."""
    return max(row_shares(tuple(p.shape), world))

