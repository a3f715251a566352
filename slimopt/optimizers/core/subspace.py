"""``SubspaceOptimizer``: the frame every low-rank method of slimopt is a recipe of.

Per 2-D parameter whose group has an integer ``rank`` below the matrix's smaller side:

1. Work in the canonical orientation: ``G`` (d x k) with ``d <= k`` (the matrix, or its transpose),
   so the basis ``S`` is ``d x r`` and the moments ``r x k`` -- the smaller state, as GaLore does.
   A square matrix is transposed (its right side projected), as in galore-torch and Fira.
2. Every ``update_interval`` steps (and at the first) the **basis policy** (``bases/``) gives a new
   ``S``; the **moment rule** (``transport.py``: keep, reset or transport) acts on the moments.
3. The **inner rule** (a subclass: Adam in the subspace, or subspace momentum with subset-norm
   step sizes) turns ``(G, S, state)`` into an update ``U``;
   ``W <- (1 - lr * wd) W - lr * U`` (decoupled weight decay, as AdamW).

Every other parameter (not 2-D, a group with ``rank=None`` or ``dense=True``, or
``rank >= min(m, n)``, with one warning per group) gets dense AdamW.

**Low-precision moments** (``state_dtype``): a matrix's moments are decoded when it joins a
batch (a refresh's moment rule acts on them) and stored back once its batch has stepped.

**Batches.** The matrices of a group are stepped in batches of one canonical shape, dtype,
device and step count (at most ``batch_size`` matrices, and at most ``batch_bytes`` of their
gradients, at a time: that bounds the transient memory of a batch, a few ``r x k`` tensors per
matrix, while small matrices, whose launches cost most, still batch by 8):
each basis is found matrix by matrix (``_basis_for_step``: a refresh is a matrix's own event),
then the inner rule runs on the whole batch (``_step_matrices``), where a rule can use
``torch._foreach_*`` operations, one launch per batch instead of one per matrix.

**Staggered refreshes** (``stagger_refresh=True``): the refresh schedule of each matrix is
shifted by ``key mod update_interval`` steps (its *offset*: matrix ``i`` refreshes at the steps
``t > 0`` with ``(t + offset) % update_interval == 0``), so that the refreshes of a model's
matrices are spread over the interval instead of all falling on the same step. The offset is a
function of the parameter's key alone, hence the same under every engine and after a resume;
keys of named parameters are hashes, spread like random draws, and unnamed ones are consecutive,
spread evenly. The first step still finds every matrix's first basis.

Randomness: draw ``j`` of parameter ``key`` comes from a generator seeded with
``(seed, key, j)`` (``rng.Draws``), the same on every device and dtype; the state holds only integers
for it. A policy whose basis is a
pure function of its draw (``stored = False``) has its basis regenerated instead of stored.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .adam import decoupled_weight_decay_
from .base import SlimOptimizer, _caller_level
from .rng import Draws
from .transport import MOMENT_RULES, apply_moment_rule_
from .validation import check_bool, check_choice, check_int


class PendingMatrix(NamedTuple):
    """A matrix of a batch, its basis for this step found: the parameter, its state, its gradient
    and basis in the canonical orientation."""
    param: torch.Tensor
    state: dict
    grad: torch.Tensor
    basis: torch.Tensor


class SubspaceOptimizer(SlimOptimizer):
    #: names of the (first, second) subspace moments in the state; second may be None
    moment_names: tuple = ("exp_avg", "exp_avg_sq")
    #: most matrices stepped in one batch (their bases and projections are alive together)
    batch_size: int = 8
    #: most gradient bytes in one batch (a matrix larger than this is a batch of its own)
    batch_bytes: int = 64 << 20
    added_options = {**SlimOptimizer.added_options, "stagger_refresh": False, "svd": "exact"}

    # ------------------------------------------------------------------ recipe hooks
    @staticmethod
    def policy_from_group(group: dict):
        """The ``BasisPolicy`` for a group's hyperparameters (validates them)."""
        raise NotImplementedError

    def _init_inner_state(self, p, group, state, d: int, k: int, r: int) -> None:
        raise NotImplementedError

    def _inner_update(self, p, group, state, grad, basis) -> torch.Tensor:
        """The canonical ``d x k`` update ``U`` (``W <- W - lr U``); advances ``state["step"]``.
        A rule that overrides ``_step_matrices`` (a whole batch at once) need not have it."""
        raise NotImplementedError

    def _moment_corrections(self, group, state) -> tuple[float, float]:
        """The bias corrections of the subspace moments as they stand (``transport.py`` corrects
        them before a transport); (1, 1) for a rule whose moments are not bias-corrected."""
        return 1.0, 1.0

    # ------------------------------------------------------------------ set-up
    def check_group(self, group: dict) -> None:
        check_int("rank", group["rank"], 1, allow_none=True)
        check_int("update_interval", group["update_interval"], 1)
        check_choice("moment_rule", group["moment_rule"], MOMENT_RULES)
        check_bool("stagger_refresh", group["stagger_refresh"])
        self._policy(group)  # validates the policy's options (built once per option set)

    def check_group_params(self, group: dict) -> None:
        if group["rank"] is None or group["dense"]:
            return
        dense_shapes = [tuple(p.shape) for p in group["params"]
                        if p.dim() == 2 and group["rank"] >= min(p.shape)]
        if dense_shapes:
            warnings.warn(f"{type(self).__name__}: rank={group['rank']} is at or above the smaller "
                          f"side of {len(dense_shapes)} matrix parameter(s) {dense_shapes[:4]}"
                          f"{'...' if len(dense_shapes) > 4 else ''}; they get dense AdamW",
                          stacklevel=_caller_level())

    def draws_randomly(self, group: dict) -> bool:
        return self._policy(group).random

    def _policy(self, group: dict):
        """``policy_from_group(group)``, built once per distinct set of options (a step asks for
        it once per matrix); ``policy_from_group`` reads only the group's options (the
        keyword-only hyperparameters), which key the cache."""
        try:
            signature = tuple(group[k] for k in self.option_defaults)
            cache = self.__dict__.setdefault("_policies", {})
            if signature not in cache:
                cache[signature] = self.policy_from_group(group)
            return cache[signature]
        except (TypeError, KeyError):  # an unhashable or missing option: checked elsewhere
            return self.policy_from_group(group)

    @staticmethod
    def refresh_offset(group: dict, state: dict) -> int:
        """How many steps the refresh schedule of the matrix with ``state`` is shifted by (0
        unless the group staggers its refreshes): it refreshes at the steps ``t > 0`` with
        ``(t + offset) % update_interval == 0``."""
        return state["key"] % group["update_interval"] if group["stagger_refresh"] else 0

    def matrix_rule_name(self, group: dict) -> str:
        return f"{type(self).__name__} (rank-{group['rank']} subspace)"

    def takes_matrix_rule(self, param: torch.Tensor, group: dict) -> bool:
        rank = group["rank"]
        return (param.dim() == 2 and not group["dense"] and rank is not None
                and rank < min(param.shape))

    @staticmethod
    def _canonical(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The ``d x k`` (``d <= k``) view of a parameter-shaped matrix. A square matrix is
        transposed too, so that its right side is projected, as galore-torch and Fira do."""
        return t.transpose(0, 1) if param.shape[0] >= param.shape[1] else t

    def _init_matrix_state(self, p, group, state) -> None:
        d, k = sorted(p.shape)
        r = group["rank"]
        if self._policy(group).stored:
            state["basis"] = torch.zeros(d, r, dtype=p.dtype, device=p.device)
        self._init_inner_state(p, group, state, d, k, r)

    # ------------------------------------------------------------------ bases
    def _draw(self, policy, state, grad32, rank, interval, previous=None):
        """The basis of ``interval``: the policy's first, or its move from ``previous``."""
        gen = Draws(self.seed, state["key"], interval)
        if interval == 0:
            return policy.initial(grad32, rank, gen).contiguous()
        # one memory layout (QR's Q is column-major): the same rounding whether a basis is
        # stored or regenerated, and one compiled graph
        return policy.next(previous, grad32, rank, gen).contiguous()

    def _basis_for_step(self, p, group, state, grad) -> torch.Tensor:
        policy = self._policy(group)
        rank, t = group["rank"], state["step"]
        position = t + self.refresh_offset(group, state)
        interval = position // group["update_interval"]
        if t != 0 and position % group["update_interval"] != 0:
            if policy.stored:
                return state["basis"]
            return self._draw(policy, state, grad.to(self._work_dtype(p)), rank,
                              interval).to(p.dtype)
        grad32 = grad.to(self._work_dtype(p))
        if t == 0:
            basis = self._draw(policy, state, grad32, rank, interval)
        else:
            old = state["basis"] if policy.stored else self._draw(policy, state, grad32, rank,
                                                                  interval - 1)
            basis = self._draw(policy, state, grad32, rank, interval, old.to(grad32.dtype))
            first, second = self.moment_names
            apply_moment_rule_(group["moment_rule"], state[first],
                               state[second] if second else None, old, basis,
                               self._moment_corrections(group, state))
        if policy.stored:
            state["basis"].copy_(basis)
            return state["basis"]
        return basis.to(p.dtype)

    @torch.no_grad()
    def current_basis(self, p: torch.Tensor) -> torch.Tensor | None:
        """The basis ``S`` (``d x r``, canonical orientation) a low-rank parameter used at its last
        step, regenerated if the policy does not store it; ``None`` for dense parameters or before
        the first step."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(f"current_basis: the tensor of shape {tuple(p.shape)} is not one of "
                             f"this {type(self).__name__}'s parameters")
        state = self.state.get(p)
        if not state or not self.takes_matrix_rule(p, group) or state["step"] == 0:
            return None
        if "basis" in state:
            return state["basis"]
        dummy = torch.empty(sorted(p.shape), device=p.device, dtype=self._work_dtype(p))
        position = state["step"] - 1 + self.refresh_offset(group, state)
        return self._draw(self._policy(group), state, dummy, group["rank"],
                          position // group["update_interval"]).to(p.dtype)

    # ------------------------------------------------------------------ step
    def _update_group(self, group: dict, finite: dict) -> None:
        """Dense parameters one by one; matrices in batches (module docstring)."""
        batches: dict[tuple, list] = {}
        dense = []
        for p, state in self._to_step(group, finite):
            if not self.takes_matrix_rule(p, group):
                dense.append((p, state))
                continue
            grad = self._canonical(p.grad, p)
            self._open_moments(p, state)  # the moment rule of a refresh acts on them too
            pending = PendingMatrix(p, state, grad, self._basis_for_step(p, group, state, grad))
            key = (tuple(grad.shape), grad.dtype, grad.device, state["step"])
            batch = batches.setdefault(key, [])
            batch.append(pending)
            if len(batch) == self.batch_size or \
                    len(batch) * grad.numel() * grad.element_size() >= self.batch_bytes:
                self._step_batch(group, batches.pop(key))
        for batch in batches.values():
            self._step_batch(group, batch)
        self._dense_steps(group, dense)

    def _step_batch(self, group: dict, batch: list) -> None:
        """``_step_matrices``, then the batch's low-precision moments stored back (so that at
        most a batch's, per shape, are decoded at a time)."""
        self._step_matrices(group, batch)
        for m in batch:
            self._close_moments(m.state)

    def _step_matrices(self, group: dict, batch: list) -> None:
        """Step a batch of ``PendingMatrix`` (one canonical shape, dtype and step count); by
        default one matrix at a time through ``_inner_update``."""
        for m in batch:
            update = self._inner_update(m.param, group, m.state, m.grad, m.basis)
            decoupled_weight_decay_(m.param, group["lr"], group["weight_decay"])
            m.param.add_(self._canonical(update, m.param), alpha=-group["lr"])
