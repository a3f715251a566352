"""DeepSpeed integration: ``initialize`` (a drop-in for ``deepspeed.initialize`` that reads
``{"optimizer": {"type": "slimopt.NAME", ...}}``) and the bridge that keeps the matrix math exact on
DeepSpeed's flat partitions under ZeRO stage 1, 2 and 3.

Under ZeRO DeepSpeed hands the client optimizer one flat 1-D fp32 partition per (sub-)group and
rank: a matrix-aware rule run on it would silently become a vector rule. The bridge instead
(the layout FSDP2's adapter uses, ``slimopt.distributed.fsdp``):

- **element-wise parameters** (the dense AdamW rule: embeddings and heads in a dense group, norms,
  biases) are stepped by every rank on the slice of the fp32 master partition it already holds
  (ZeRO-1/2: its ``Holding``; ZeRO-3: its chunk), in place, with no communication; their state
  (``exp_avg``, ``exp_avg_sq``) is slice-sized and stays on that rank. AdamW is element-wise, so
  this is the single-process math exactly. Whether a gradient is finite is decided per whole
  parameter by all ranks together (one all-reduce of flags per sub-group and step), so a NaN in
  one rank's slice skips the parameter on every rank, as in one process;
- **matrices** (every matrix rule; a LoRA pair group, ``zero_unit="group"``, is one unit) each
  have one owner rank, planned once by ``fsdp.plan`` (the planner of both engines): the
  element-wise slices counted first, then the units largest state first, each to the rank holding
  the least state bytes so far. The owner keeps the unit's state and steps a full-size fp32
  "shadow" of it with the exact single-process code. A shadow is a persistent handle (the
  optimizer's state is keyed by it) whose storage exists only during the step.

ZeRO-1/2 (a group's flat buffer cut into ``world`` consecutive pieces; offsets read from the
parameters' storage, not re-derived from DeepSpeed's padding rules): a matrix that lies whole in
its owner's partition is stepped in place on views of the fp32 master partition: no copy, no
communication. The pieces of any other matrix move point to point: values and gradients to the
owner, new values back (``p2p_sent``).

ZeRO-3 (every parameter cut into ``world`` even chunks): per matrix, ``Transfer.gather_to`` its
chunks (values and gradients) on the owner, step, ``Transfer.scatter_from`` the new chunks back:
``2N/W`` elements sent and ``N/W`` received per rank and step for the matrices' ``N`` elements;
transient memory is one matrix.

Optimizer/parameter offload and fp16 are refused at ``initialize``. Checkpoints go through
``engine.save_checkpoint``/``load_checkpoint``; the bridge's ``load_state_dict`` refuses a state
that does not fit (one rank's share at another world size, another rank's share, other shapes or
options) before it changes anything; ``slimopt.launch.zero_checkpoint`` moves checkpoints to
another world size.

The owner planning is ``slimopt.distributed.fsdp.plan`` (on ``owners.assign_owners``), the
collectives ``slimopt.distributed.transfer.Transfer``; the bridge reaches the optimizer only
through its public seam (``param_key``, ``adopt_key``, ``check_options``, ``step_params``,
``attach_step_router``). ``slimopt.launch.initialize`` and ``slimopt.launch.zero`` re-export
this module's names.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import NamedTuple

import torch

from ..launch import records
from ..launch.registry import split_for
from ..optimizers.core import state_checks
from ..optimizers.core.base import SlimOptimizer
from .fsdp import plan, units_of
from .owners import Holding, Slot, holders, shape_numel
from .transfer import Transfer, release, table_of, whole

PREFIX = "slimopt."


class Piece(NamedTuple):
    """This rank's slice of one element-wise parameter: elements ``[lo, hi)`` of the flattened
    parameter, at ``at`` in this rank's flat fp32 partition."""
    slot: Slot
    lo: int
    hi: int
    at: int


class ZeroBridge:
    """Maps DeepSpeed's flat partitions to whole matrices and element-wise slices (see the module
    docstring). Built from a ``DeepSpeedZeroOptimizer`` (ZeRO-1/2) or a
    ``DeepSpeedZeroOptimizer_Stage3``.

    Both stages hand the client optimizer one flat fp32 partition per (sub-)group and rank, the
    same size on every rank; what differs is where a parameter lies in it. ZeRO-1/2 cut the
    concatenated group into ``world`` consecutive pieces: rank ``r`` holds
    ``[r * size, (r + 1) * size)`` of the group's flat buffer, a parameter lies at
    ``[offset, offset + numel)`` of it (its ``Holding``s say who holds which part). ZeRO-3 cuts
    every parameter into ``world`` chunks of ``chunk = ceil(numel / world)`` elements (the last
    one padded), and a rank's partition concatenates its chunks. Each parameter's place is a
    ``Slot``."""

    def __init__(self, optimizer: SlimOptimizer, zero_optimizer):
        self.zero = zero_optimizer
        self.stage3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat")
        self.process_group = (zero_optimizer.dp_process_group if self.stage3
                              else zero_optimizer.real_dp_process_group[0])
        #: the rooted collectives and their element counts (``communicated``)
        self.transfer = Transfer(self.process_group)
        self.dist, self.rank, self.world = self.transfer.dist, self.transfer.rank, \
            self.transfer.world
        self.slots = []       # per sub-group: its parameters' ``Slot``s, in partition order
        self.units = []       # per sub-group: [(matrix unit: list of ``Slot``s, owner rank)]
        self.dense = []       # per sub-group: the ``Slot``s of its element-wise parameters
        self.pieces = []      # per sub-group: this rank's ``Piece``s of them
        self.sub_group_of = {}  # id(flat fp32 partition) -> sub-group index
        self.partitions = []  # this rank's flat fp32 partition per sub-group
        #: param group index -> [(key, full shape)] of its parameters, in the order stepped
        self.group_params = {}
        self.holdings = {}   # ZeRO-1/2: key -> the ``Holding``s of that parameter
        #: key -> the handle of an owned matrix or of this rank's slice of an element-wise
        #: parameter: the state's key, empty between steps
        self.shadows = {}
        self.p2p_sent = 0    # ZeRO-1/2: elements this rank sent point to point so far
        #: state bytes per rank that the plan predicts (``fsdp.plan``)
        self.planned_bytes = None
        meta_groups, slot_of = [], {}
        split_check = set()
        for s, (group_index, flat, entries) in enumerate(self._layout(optimizer)):
            self.sub_group_of[id(flat)] = s
            self.partitions.append(flat)
            self.slots.append(entries)
            group = optimizer.param_groups[group_index]
            self.device = flat.device
            if group.get("zero_unit") == "group":
                if group_index in split_check:
                    raise ValueError(
                        f"{type(optimizer).__name__}: DeepSpeed split a parameter group that "
                        "must be stepped as one unit (a LoRA pair) into several sub-groups; "
                        "raise zero_optimization.sub_group_size")
                split_check.add(group_index)
            self.group_params.setdefault(group_index, []).extend(
                (slot.key, slot.shape) for slot in entries)
            for slot in entries if not self.stage3 else ():  # fixed, so once
                self.holdings[slot.key] = holders(slot.offset, shape_numel(slot.shape),
                                                  flat.numel(), self.world)
            metas = [torch.empty(slot.shape, dtype=torch.float32, device="meta")
                     for slot in entries]
            slot_of.update({id(m): slot for m, slot in zip(metas, entries)})
            meta_groups.append(dict(group, params=metas))
            group["zero_index"] = group_index
        self._plan(optimizer, meta_groups, slot_of)

    def _plan(self, optimizer, meta_groups, slot_of) -> None:
        """Owners of the matrix units, balancing state bytes with the element-wise slices counted
        first (``fsdp.plan``, the planner FSDP2 uses), and this rank's element-wise pieces."""
        planned = plan(optimizer, self.world, meta_groups,
                       shares=lambda p: self.shares(slot_of[id(p)]))
        owner = {slot_of[id(p)].key: r for unit, r in zip(planned.units, planned.owners)
                 for p in unit}
        self.planned_bytes = list(planned.per_rank)
        for s, group in enumerate(meta_groups):
            dense, units = units_of(optimizer, group)
            self.dense.append([slot_of[id(p)] for p in dense])
            self.units.append([([slot_of[id(p)] for p in unit], owner[slot_of[id(unit[0])].key])
                               for unit in units])
            self.pieces.append([self._piece(optimizer, group, slot, s) for slot in self.dense[-1]
                                if self.shares(slot)[self.rank] > 0])

    def shares(self, slot) -> list[int]:
        """Elements of the parameter at ``slot`` each rank's partition holds."""
        n = shape_numel(slot.shape)
        if self.stage3:
            return [max(0, min(slot.chunk, n - r * slot.chunk)) for r in range(self.world)]
        count = [0] * self.world
        for held in self.holdings[slot.key]:
            count[held.rank] += held.end - held.start
        return count

    def _piece(self, optimizer, group, slot, s) -> Piece:
        """This rank's slice of element-wise ``slot``, refused if the optimizer would give the
        slice (a 1-D tensor) another rule than the whole parameter."""
        if self.stage3:
            lo = self.rank * slot.chunk
            piece = Piece(slot, lo, min(shape_numel(slot.shape), lo + slot.chunk), slot.offset)
        else:
            held = next(h for h in self.holdings[slot.key] if h.rank == self.rank)
            size = self.partitions[s].numel()
            piece = Piece(slot, held.start - slot.offset, held.end - slot.offset,
                          held.start - self.rank * size)
        meta = torch.empty(piece.hi - piece.lo, dtype=torch.float32, device="meta")
        if optimizer.takes_matrix_rule(meta, group):
            raise TypeError(
                f"{type(optimizer).__name__}: parameter {slot.key} (shape {slot.shape}) takes the "
                "element-wise rule but a 1-D slice of it would take the matrix rule, so it cannot "
                "be stepped on DeepSpeed's slices; put it in a dense=True group (as "
                "slimopt.param_groups does)")
        return piece

    @property
    def communicated(self) -> dict:
        """Elements this rank passed to each collective so far (``gather``, ``scatter``,
        ``p2p_sent``), for the communication report."""
        out = dict(self.transfer.communicated)
        if self.p2p_sent:
            out["p2p_sent"] = self.p2p_sent
        return out

    def _layout(self, optimizer):
        """(param group index, flat fp32 partition, its parameters' ``Slot``s) per flat
        partition."""
        zero = self.zero

        def key_of(p):
            key = optimizer.param_key(p)
            if key is None:
                raise RuntimeError("slimopt ZeRO bridge: a DeepSpeed parameter is unknown to "
                                   "the optimizer")
            return key

        if not self.stage3:
            for i, lp_params in enumerate(zero.bit16_groups):
                flat = zero.bit16_groups_flat[i]
                entries = [Slot(key_of(p), (p.data_ptr() - flat.data_ptr()) // p.element_size(),
                                tuple(p.shape), None) for p in lp_params]
                yield i, zero.single_partition_of_fp32_groups[i], entries
            return
        for s, params in enumerate(zero.fp16_groups):
            offset, entries = 0, []
            for p in params:  # a rank's partition concatenates its chunks in this order
                chunk = int(p.partition_numel())
                entries.append(Slot(key_of(p), offset, tuple(p.ds_shape), chunk))
                offset += chunk
            flat = zero.fp32_partitioned_groups_flat[s]
            if offset != flat.numel():
                raise RuntimeError(f"slimopt ZeRO bridge: sub-group {s} holds {flat.numel()} "
                                   f"elements, its parameters' pieces {offset}")
            yield zero.sub_group_to_group_id[s], flat, entries

    #: the bridge checks its groups' gradients itself, per whole unit on its owner
    checks_gradients = True

    @staticmethod
    def routes(group) -> bool:
        """Whether ``group`` is one of DeepSpeed's flat partitions, which the bridge steps
        (``SlimOptimizer.attach_step_router``)."""
        return "zero_index" in group

    def partition(self, s):
        """This rank's flat fp32 partition of sub-group ``s`` (DeepSpeed's master weights)."""
        return self.partitions[s]


    def owner_of(self, key):
        """The rank owning matrix ``key``; None for an element-wise parameter (every rank keeps
        the state of the slice it holds)."""
        return next((r for units in self.units for unit, r in units
                     if any(slot.key == key for slot in unit)), None)

    def owned_keys(self):
        """Keys of the matrices this rank owns."""
        return [slot.key for units in self.units for unit, r in units if r == self.rank
                for slot in unit]

    def my_pieces(self) -> dict:
        """key -> this rank's ``Piece`` of each element-wise parameter it holds part of."""
        return {piece.slot.key: piece for pieces in self.pieces for piece in pieces}

    def _shadow(self, optimizer, key, values=None, grad=None):
        """The handle of matrix or slice ``key``; with ``values``/``grad``, made to hold them for
        a step."""
        shadow = self.shadows.get(key)
        if shadow is None:
            shadow = torch.empty(0, dtype=torch.float32, device=self.device)
            self.shadows[key] = shadow
            optimizer.adopt_key(shadow, key)
        if values is not None:
            shadow.data = values
            shadow.grad = grad
        return shadow

    def write(self, table, offset, shape, chunk, values):
        """Put a full-size parameter (``offset``, ``shape``, ``chunk``: its ``Slot``'s) into its
        places in a ``(world, size)`` table of every rank's partition."""
        n = shape_numel(shape)
        if chunk is None:
            table.view(-1)[offset:offset + n].copy_(values.reshape(-1))
            return
        table[:, offset:offset + chunk].copy_(table_of(values, self.world, chunk))

    @torch.no_grad()
    def raise_if_nonfinite(self, optimizer, groups) -> None:
        """``nonfinite="raise"``: whether any rank's partition gradient in ``groups`` holds NaN
        or Inf is decided by all ranks together (one fused norm per partition and one
        all-reduce) before any unit steps. So every rank raises, nothing changes anywhere, and no
        rank is left waiting in a collective for an owner that raised alone."""
        grads = [g["params"][0].grad for g in groups
                 if g["params"] and g["params"][0].grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        if grads:
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            bad = (~norms.isfinite().all()).float()
        self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX, group=self.process_group)
        if bool(bad):
            raise FloatingPointError(
                f"{type(optimizer).__name__}: a non-finite gradient on some rank (ZeRO "
                f"partition, world size {self.world}); nothing was updated on any rank")


    def step_group(self, optimizer, group, finite=None):
        """Step DeepSpeed's flat partition ``group`` (``finite`` is None: the bridge decides the
        element-wise parameters' finiteness jointly and checks each matrix unit whole on its
        owner)."""
        if not group["params"]:
            return  # ZeRO-3 steps one sub-group at a time; the others are empty meanwhile
        part = group["params"][0]
        if part.grad is None:
            return
        s = self.sub_group_of[id(part)]
        grad = part.grad.to(part.dtype)
        self._step_elementwise(optimizer, group, part.data, grad, s)
        if self.stage3:
            self._step_by_unit(optimizer, group, part, grad, s)
        else:
            self._step_local(optimizer, group, part, grad, s)

    def _step_elementwise(self, optimizer, group, values, grad, s) -> None:
        """Every rank steps its own slices of sub-group ``s``'s element-wise parameters, in place
        on views of its fp32 master partition ``values`` and ``grad``: no communication but one
        all-reduce of finiteness flags, so a non-finite gradient anywhere in a parameter skips
        it on every rank, as in one process."""
        if not self.dense[s]:
            return
        shadows = {piece.slot.key: self._shadow(optimizer, piece.slot.key,
                                                values[piece.at:piece.at + piece.hi - piece.lo],
                                                grad[piece.at:piece.at + piece.hi - piece.lo])
                   for piece in self.pieces[s]}
        finite = self._agree_finite(optimizer, self.dense[s], shadows)
        if shadows:
            optimizer.step_params(dict(group, params=list(shadows.values())), finite)
        for shadow in shadows.values():
            release(shadow)

    def _agree_finite(self, optimizer, dense, shadows) -> dict:
        """shadow -> whether its whole parameter's gradient is finite on every rank (one
        all-reduce over the ``dense`` parameters of a sub-group). ``nonfinite="raise"`` decided
        before any step (``raise_if_nonfinite``) and ``"off"`` checks nothing: all finite."""
        if optimizer.nonfinite != "skip":
            return {}
        flags = torch.ones(len(dense), dtype=torch.bool, device=self.device)
        mine = [i for i, slot in enumerate(dense) if slot.key in shadows]
        if mine:
            grads = [shadows[dense[i].key].grad for i in mine]
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            flags[mine] = norms.isfinite()
        flags = self.transfer.agree_all(flags).tolist()
        return {shadows[slot.key]: flags[i] for i, slot in enumerate(dense)
                if slot.key in shadows}

    def _exchange(self, ops):
        """Post point-to-point ``(send?, tensor, group rank)`` operations together and wait."""
        if not ops:
            return
        dist = self.dist
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend if send else dist.irecv, tensor,
                       self.transfer.global_rank(peer), self.process_group)
            for send, tensor, peer in ops])
        for request in requests:
            request.wait()
        self.p2p_sent += sum(t.numel() for send, t, _ in ops if send)

    def _step_local(self, optimizer, group, part, grad, s):
        """ZeRO-1/2 matrices: a unit inside its owner's partition is stepped in place on views of
        the fp32 master partition and its gradient: no copy, no communication. The pieces of the
        other units travel point to point: values and gradients to the owner, the new values
        back."""
        units = self.units[s]
        received = self._bring_straddlers(units, part, grad)
        outbound = []
        for unit, owner in units:
            if owner != self.rank:  # my slices of others' units come back
                outbound += [(False, self._slice(part.data, held), owner)
                             for slot in unit for held in self.holdings[slot.key]
                             if held.rank == self.rank]
                continue
            shadows = [self._shadow(optimizer, slot.key, *self._whole(part, grad, slot, received))
                       for slot in unit]
            optimizer.step_params(dict(group, params=shadows))
            for slot, shadow in zip(unit, shadows):
                outbound += self._put_back(part, slot, shadow)
                release(shadow)
        self._exchange(outbound)

    def _slice(self, flat, held):
        """The slice ``held`` (a ``Holding`` of this rank) of this rank's partition ``flat``."""
        base = self.rank * flat.numel()
        return flat[held.start - base:held.end - base]

    def _in_place(self, key) -> bool:
        """Whether parameter ``key`` lies whole in this rank's partition (ZeRO-1/2)."""
        return [held.rank for held in self.holdings[key]] == [self.rank]

    def _bring_straddlers(self, units, part, grad) -> dict:
        """ZeRO-1/2: this rank's slices of straddling units go to their owners, other ranks'
        slices of the units it owns come in, posted together. Returns ``{(key, rank): (values,
        grads)}`` of what came in."""
        inbound, received = [], {}
        for unit, owner in units:  # every rank walks the units in the same order
            for slot in unit:
                for held in self.holdings[slot.key]:
                    if held.rank == owner:
                        continue
                    if held.rank == self.rank:
                        inbound += [(True, self._slice(part.data, held), owner),
                                    (True, self._slice(grad, held), owner)]
                    elif owner == self.rank:
                        n = held.end - held.start
                        pair = (torch.empty(n, dtype=part.dtype, device=part.device),
                                torch.empty(n, dtype=part.dtype, device=part.device))
                        received[(slot.key, held.rank)] = pair
                        inbound += [(False, pair[0], held.rank), (False, pair[1], held.rank)]
        self._exchange(inbound)
        return received

    def _put_back(self, part, slot, shadow) -> list:
        """ZeRO-1/2, on the owner, after the step: the new values of ``slot`` (in ``shadow``)
        go to the ranks holding them, this rank's slices copied into its partition, the others'
        returned as sends; nothing for a parameter stepped in place."""
        if self._in_place(slot.key):
            return []
        new, sends = shadow.data.reshape(-1), []
        for held in self.holdings[slot.key]:
            lo, hi = held.start - slot.offset, held.end - slot.offset
            if held.rank == self.rank:
                self._slice(part.data, held).copy_(new[lo:hi])
            else:  # the slice keeps the released storage alive until sent
                sends.append((True, new[lo:hi], held.rank))
        return sends

    def _whole(self, part, grad, slot, received):
        """ZeRO-1/2, on the owner: the values and gradient of the parameter at ``slot``, full
        size: views of this rank's partition when it holds all of it (stepped in place), else
        new tensors assembled from its own slices and the ``received`` ones."""
        n, shape = shape_numel(slot.shape), slot.shape
        if self._in_place(slot.key):
            whole = Holding(self.rank, slot.offset, slot.offset + n)
            return (self._slice(part.data, whole).view(shape),
                    self._slice(grad, whole).view(shape))
        values = torch.empty(n, dtype=part.dtype, device=part.device)
        grads = torch.empty(n, dtype=part.dtype, device=part.device)
        for held in self.holdings[slot.key]:
            lo, hi = held.start - slot.offset, held.end - slot.offset
            if held.rank == self.rank:
                values[lo:hi] = self._slice(part.data, held)
                grads[lo:hi] = self._slice(grad, held)
            else:
                values[lo:hi], grads[lo:hi] = received[(slot.key, held.rank)]
        return values.view(shape), grads.view(shape)


    def _step_by_unit(self, optimizer, group, part, grad, s):
        """ZeRO-3 matrices: for each unit, gather its parameters' chunks (values and gradients)
        on the owner (``Transfer.gather_to``), step there, scatter the new chunks back
        (``scatter_from``). Every parameter is split evenly, so the collectives are rooted
        ``gather``/``scatter`` of ``chunk`` elements, and the transient memory is one unit at full
        size."""
        for unit, owner in self.units[s]:
            mine = owner == self.rank
            shadows = []
            for slot in unit:
                local = slice(slot.offset, slot.offset + slot.chunk)
                values = self.transfer.gather_to(part.data[local], owner)
                grads = self.transfer.gather_to(grad[local], owner)
                if mine:
                    shadows.append(self._shadow(optimizer, slot.key, whole(values, slot.shape),
                                                whole(grads, slot.shape)))
            if mine:
                optimizer.step_params(dict(group, params=shadows))
            for i, slot in enumerate(unit):
                table = table_of(shadows[i].data, self.world, slot.chunk) if mine else None
                if mine:
                    release(shadows[i])
                self.transfer.scatter_from(table, part.data[slot.offset:slot.offset + slot.chunk],
                                           owner)


    # ---------------------------------------------------------------- checkpoints
    def _saved(self, optimizer, key):
        """The state of matrix or slice ``key`` on this rank, None before its first step."""
        shadow = self.shadows.get(key)
        return optimizer.state.get(shadow) if shadow is not None else None

    def state_dict(self, optimizer):
        """Plain data, keyed by the parameters' optimizer-wide index: ``state`` holds the owned
        matrices' whole states, ``slices`` this rank's slices of the element-wise parameters
        (``{key: {"start": first element of the flattened parameter, "shape": its full shape,
        "state": the slice's state}}``), which ``slimopt.launch.zero_checkpoint`` concatenates
        back into whole states."""
        state = {str(key): self._saved(optimizer, key) for key in self.owned_keys()
                 if self._saved(optimizer, key)}
        slices = {str(key): {"start": piece.lo, "shape": list(piece.slot.shape),
                             "state": self._saved(optimizer, key)}
                  for key, piece in self.my_pieces().items() if self._saved(optimizer, key)}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"slimopt_zero": 1, "world_size": self.world, "state": state, "slices": slices,
                "param_groups": groups}

    def load_state_dict(self, optimizer, state_dict, merged=False):
        """Load ``state_dict`` after ``check_state_dict`` (a state that does not fit changes
        nothing). ``merged``: every parameter's whole state in one (``load_resharded``); each
        rank takes those of the matrices it owns and cuts its slices of the element-wise
        ones."""
        self.check_state_dict(optimizer, state_dict, merged)
        for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k not in ("params", "zero_index")})
        owned, pieces = set(self.owned_keys()), self.my_pieces()
        for key_text, entry in state_dict["state"].items():
            key = int(key_text)
            if key in owned:
                self._load_entry(optimizer, key, entry)
            elif key in pieces:  # a merged whole state: this rank's slice of it
                piece = pieces[key]
                self._load_entry(optimizer, key, {
                    k: (v.reshape(-1)[piece.lo:piece.hi].clone() if torch.is_tensor(v) else v)
                    for k, v in entry.items()})
        for key_text, record in (state_dict.get("slices") or {}).items():
            self._load_entry(optimizer, int(key_text), record["state"])

    def _load_entry(self, optimizer, key, entry) -> None:
        shadow = self._shadow(optimizer, key)
        optimizer.state[shadow] = {k: (v.to(shadow.device) if torch.is_tensor(v) else v)
                                   for k, v in entry.items()}

    def check_state_dict(self, optimizer, state_dict, merged=False) -> None:
        """Raise a ``ValueError`` naming what does not fit, changing nothing: not a ZeRO-bridge
        state; one rank's share written at another world size (it would leave the other
        matrices without state); another rank's share; group options the optimizer refuses;
        a parameter this optimizer lacks; a state of other keys or shapes; slices other than
        the ones this rank holds (or any slices in a ``merged`` state)."""
        name = type(optimizer).__name__
        if not isinstance(state_dict, dict) or state_dict.get("slimopt_zero") != 1:
            raise ValueError("not a slimopt ZeRO optimizer state (was it saved by another "
                             "optimizer?)")
        saved_world = state_dict.get("world_size")
        if not merged and saved_world != self.world:
            raise ValueError(
                f"{name}: this optimizer state is one rank's share of a ZeRO checkpoint written "
                f"at world size {saved_world}; this engine runs at world size {self.world}, "
                "where it would leave the other ranks' matrices without state. Move it with "
                "python -m slimopt.launch.zero_checkpoint and slimopt.launch.load_resharded")
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        slices = state_dict.get("slices") or {}
        if not isinstance(groups, list) or not isinstance(state, dict) \
                or not isinstance(slices, dict):
            raise ValueError(f"{name}: a ZeRO optimizer state needs a dict 'state' and a list "
                             "'param_groups' (and 'slices', if present, a dict)")
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(f"{name}: the state has {len(groups)} parameter group(s), the "
                             f"optimizer {len(optimizer.param_groups)}")
        expected, shapes = {}, dict(p for ps in self.group_params.values() for p in ps)
        for index, saved in enumerate(groups):
            expected.update(self._expected_state(optimizer, saved, index))
        for key_text, entry in state.items():
            key = _parameter_key(key_text, name)
            if key not in expected:
                raise ValueError(f"{name}: the state holds parameter {key}, which this "
                                 "optimizer does not have (another model?)")
            if not merged:
                self._check_mine(key, name)
            state_checks.check_param_state(entry, expected[key], optimizer.optional_state_keys,
                                           f"{name}: parameter {key} (shape {shapes[key]})")
        self._check_slices(optimizer, slices, groups, merged)

    def _check_mine(self, key, name) -> None:
        """Refuse the whole state of ``key`` in one rank's share unless this rank owns it."""
        owner = self.owner_of(key)
        if owner is None:
            raise ValueError(
                f"{name}: the state holds the whole state of element-wise parameter {key}, "
                "which every rank keeps as the slice it holds: this is a merged state; load it "
                "with slimopt.launch.load_resharded")
        if owner != self.rank:
            raise ValueError(f"{name}: parameter {key}'s state belongs to rank {owner} here, "
                             f"not to rank {self.rank}: this is another rank's share, or the "
                             "model or config changed")

    def _check_slices(self, optimizer, slices, groups, merged) -> None:
        """Each of ``slices`` is the slice of an element-wise parameter this rank holds, with the
        state such a slice has under the saved group's options."""
        name = type(optimizer).__name__
        if merged and slices:
            raise ValueError(f"{name}: a merged state holds whole states, this one per-rank "
                             "slices: merge it with python -m slimopt.launch.zero_checkpoint")
        pieces = self.my_pieces()
        group_of = {key: index for index, ps in self.group_params.items() for key, _ in ps}
        for key_text, record in slices.items():
            key = _parameter_key(key_text, name)
            piece = pieces.get(key)
            if not isinstance(record, dict) or piece is None \
                    or record.get("start") != piece.lo \
                    or tuple(record.get("shape", ())) != piece.slot.shape:
                held = (f"elements [{piece.lo}, {piece.hi}) of shape {piece.slot.shape}"
                        if piece is not None else "no slice of it")
                raise ValueError(f"{name}: the state's slice of parameter {key} is not the one "
                                 f"rank {self.rank} holds ({held}): another rank's share, "
                                 "another world size, or the model or config changed")
            meta = torch.empty(piece.hi - piece.lo, dtype=torch.float32, device="meta")
            fresh = optimizer.expected_state(dict(groups[group_of[key]], params=[meta]))[0]
            state_checks.check_param_state(record.get("state"), fresh,
                                           optimizer.optional_state_keys,
                                           f"{name}: rank {self.rank}'s slice of parameter {key}")


    def _expected_state(self, optimizer, saved, index) -> dict:
        """key -> the fresh state (meta tensors) of each parameter of group ``index`` under the
        saved group's options, which the optimizer's own checks must accept."""
        if not isinstance(saved, dict):
            raise ValueError(f"group {index} of the state is not a dict")
        state_checks.check_group_options(saved, optimizer.defaults, index)
        params = self.group_params.get(index, [])
        metas = [torch.empty(shape, dtype=torch.float32, device="meta") for _, shape in params]
        group = dict(saved, params=metas)
        try:
            optimizer.check_options(group)
        except ValueError as err:
            raise ValueError(f"{type(optimizer).__name__}: group {index} of the state: "
                             f"{err}") from None
        return dict(zip((key for key, _ in params), optimizer.expected_state(group)))


def _parameter_key(text, name) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: the state's key {text!r} is not a parameter index") from None


def _load_config(config):
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"{config}: a DeepSpeed config is a JSON object ({{...}}), got "
                             f"{_json_kind(cfg)}")
        return cfg
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise TypeError(f"config must be a dict or a JSON file path, got {type(config).__name__}")


def _json_kind(value) -> str:
    """``value``'s kind in JSON's words, for error messages ("a list", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number",
             float: "a number"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def _section_params(section) -> dict:
    """``section["params"]`` (absent: no options), refused unless a JSON object."""
    if not isinstance(section, dict):
        raise ValueError('the "optimizer" section must be a JSON object {"type": '
                         f'"slimopt.NAME", "params": {{...}}}}, got {_json_kind(section)}')
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError('optimizer.params must be a JSON object of the optimizer\'s options '
                         f'(such as {{"lr": 0.001, "rank": 128}}), got {_json_kind(params)}: '
                         f"{params!r}")
    return dict(params)


def build_from_config(section: dict, model) -> SlimOptimizer:
    """The slimopt optimizer an ``{"type": "slimopt.NAME", "params": {...}}`` section names,
    with ``param_groups(model)`` applied (``rank`` goes to the matrix group)."""
    params = _section_params(section)
    kind = section.get("type", "")
    if not isinstance(kind, str):
        raise ValueError(f'optimizer.type must be a string such as "slimopt.GrassWalk", got '
                         f"{_json_kind(kind)}")
    method = records.from_deepspeed(kind)
    if method is None:
        known = sorted(m.deepspeed_name for m in records.in_suite(records.DEEPSPEED))
        raise ValueError(f"unknown slimopt optimizer {kind!r}; known: {', '.join(known)}")
    rank = params.pop("rank", None) if method.ranked else None
    target = split_for(method, model, rank)
    try:
        return method.build(target, **params)
    except TypeError as err:
        raise ValueError(f"{kind}: {err}") from None


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None,
               **kwargs):
    """``deepspeed.initialize`` with slimopt's optimizers: a config whose ``optimizer.type``
    starts with ``slimopt.`` builds that optimizer (``param_groups`` applied); a slimopt
    optimizer (built here or passed in) under ZeRO-1/2/3 gets the exact-matrix bridge; offload and
    fp16 are refused. Everything else goes to DeepSpeed unchanged. Returns DeepSpeed's 4-tuple."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    cfg = _load_config(config if config is not None else kwargs.pop("config_params", None))
    section = cfg.get("optimizer")
    if section is not None and not isinstance(section, dict):
        _section_params(section)  # refuses it, naming the field
    if isinstance(section, dict) and str(section.get("type", "")).lower().startswith(PREFIX):
        if optimizer is not None:
            raise ValueError("both an optimizer object and a slimopt optimizer in the config: "
                             "pass one")
        if model is None:
            raise ValueError("a slimopt optimizer from the config needs model=")
        optimizer = build_from_config(section, model)
        del cfg["optimizer"]
        model_parameters = None
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if isinstance(optimizer, SlimOptimizer):
        refuse_offload(optimizer, cfg.get("zero_optimization", {}))
        if cfg.get("fp16", {}).get("enabled"):
            raise ValueError("fp16 with slimopt optimizers is not supported; use bf16")
        if stage >= 1:
            optimizer.check_sharding_engine(f"DeepSpeed ZeRO-{stage}")
            cfg["zero_allow_untested_optimizer"] = True
    with _first_step_skipped(optimizer):
        engine, opt, loader, sched = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
            config=cfg, **kwargs)
    read_checkpoints_safely(engine)
    if isinstance(optimizer, SlimOptimizer):
        attach_to_engine(optimizer, engine, stage)
    return engine, opt, loader, sched


def refuse_offload(optimizer: SlimOptimizer, zero_cfg: dict) -> None:
    """Refuse ``zero_optimization.offload_optimizer``/``offload_param`` to a device: DeepSpeed
    would step the optimizer on host-memory partitions, which the bridge does not gather."""
    for offload in ("offload_optimizer", "offload_param"):
        device = str((zero_cfg.get(offload) or {}).get("device", "none")).lower()
        if device not in ("none", ""):
            raise ValueError(
                f"{type(optimizer).__name__} with zero_optimization.{offload} (device "
                f"{device!r}) is not supported: DeepSpeed would step the optimizer on "
                "host-memory partitions, which slimopt's bridge does not gather. Remove the "
                "offload; ZeRO-1/2/3 still shard the optimizer state across ranks.")


def attach_to_engine(optimizer: SlimOptimizer, engine, stage: int) -> None:
    """After ``deepspeed.initialize`` built ``engine`` on ``optimizer``: with
    ``nonfinite="raise"``, DeepSpeed's own discarded steps raise; under ZeRO-1/2/3 the bridge
    steps the flat partitions, under ZeRO-0 the fp32 master copies take their parameters' keys."""
    if optimizer.nonfinite == "raise":
        raise_on_skipped_steps(engine, optimizer)
    if stage >= 1:
        optimizer.attach_step_router(ZeroBridge(optimizer, engine.optimizer))
    else:
        register_master_copies(optimizer, engine.optimizer)


@contextlib.contextmanager
def _first_step_skipped(optimizer):
    """While DeepSpeed initializes, a slimopt ``optimizer`` ignores a step taken before any
    state exists on all-zero gradients: DeepSpeed's wrappers (ZeRO-0 + bf16, ZeRO-1/2/3) step
    once inside ``deepspeed.initialize`` to create the state, which is not a real step."""
    if not isinstance(optimizer, SlimOptimizer):
        yield
        return
    step = optimizer.step

    def step_or_skip(closure=None):
        if optimizer.state or not _all_grads_zero(optimizer):
            return step(closure)
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    optimizer.step = step_or_skip
    try:
        yield
    finally:
        if vars(optimizer).get("step") is step_or_skip:
            del optimizer.step


def _all_grads_zero(optimizer) -> bool:
    return all(p.grad is None or not bool(p.grad.any())
               for g in optimizer.param_groups for p in g["params"])


def raise_on_skipped_steps(engine, optimizer) -> None:
    """DeepSpeed discards a whole step itself, on every rank, when the global gradient norm is
    not finite (bf16 ZeRO-0 and ZeRO-3 always; ZeRO-1/2 when clipping), before the optimizer sees
    a gradient. ``nonfinite="raise"`` must still raise: ``engine.step()`` raises
    ``FloatingPointError`` after such a discarded step (nothing was updated). With ``"skip"``
    DeepSpeed's discard is the skip; ``engine.skipped_steps`` counts it."""
    step = engine.step

    def step_or_raise(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        out = step(*args, **kwargs)
        if boundary and not engine.was_step_applied():
            raise FloatingPointError(
                f"{type(optimizer).__name__}: DeepSpeed discarded step {engine.global_steps} "
                "because the gradient norm is not finite; nothing was updated on any rank")
        return out

    engine.step = step_or_raise


def read_checkpoints_safely(engine) -> None:
    """DeepSpeed's checkpoint engines read files with ``torch.load(weights_only=False)``; make
    ``engine.load_checkpoint`` read them through ``safe_load.load_file`` (``weights_only=True``
    and the documented allow-list) instead, so a file swapped in after a check cannot run code."""
    from ..launch.safe_load import load_file

    def load(path, map_location=None):
        return load_file(path)  # onto the CPU, as DeepSpeed's own loads ask

    engine.checkpoint_engine.load = load


def register_master_copies(optimizer: SlimOptimizer, wrapper) -> None:
    """ZeRO-0 with bf16: DeepSpeed's wrapper steps fp32 master copies of the parameters (whole
    matrices, real shapes); give each copy its parameter's key so the rules (and their random
    draws) are those of the parameter."""
    low = getattr(wrapper, "fp16_groups", None)
    high = getattr(wrapper, "fp32_groups", None)
    if low is None or high is None:
        return
    for lp_group, hp_group in zip(low, high):
        for lp, hp in zip(lp_group, hp_group):
            key = optimizer.param_key(lp)
            if key is not None:
                optimizer.adopt_key(hp, key)
