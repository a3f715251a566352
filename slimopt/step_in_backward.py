"""Optimizer steps fused into the backward pass: each parameter steps as soon as its gradient is
final, and its gradient is freed at once, so the full-size gradients of a model are never all
alive together (GaLore's ``*_per_layer``, done for every slimopt optimizer, and under DDP).

    handle = slimopt.step_in_backward(optimizer, accumulation_steps=4, max_grad_norm=1.0)
    for batch in loader:                       # one micro-batch per backward
        (model(batch).loss / 4).backward()     # parameters step during the 4th backward
        if handle.stepped:                      # the last micro-batch of an optimizer step
            scheduler.step()
    handle.remove()                             # back to ordinary optimizer.step()

- **Gradient accumulation.** A parameter steps at the backward pass that completes its
  ``accumulation_steps``-th gradient since its last step; before that its gradient accumulates
  in ``.grad`` as usual. Scale the loss by ``1 / accumulation_steps`` as with ordinary steps.
- **Clipping** (``max_grad_norm``): the global norm needs every gradient, which a step in
  backward does not wait for, so **each parameter's gradient is clipped on its own** to
  ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_`` of that one tensor). That is stricter than
  global clipping for a parameter whose own norm exceeds the bound and looser for the model as a
  whole; it is what changes against ordinary steps, and it is tested. ``take_grad_norm()`` gives
  the global norm of the (pre-clip) gradients stepped since its previous call: what
  ``clip_grad_norm_`` of the whole model would have returned, for logging.
- **Schedulers and checkpoints** work as with ordinary steps: a step reads its group's ``lr``
  when it runs, and the optimizer's state is its own (``state_dict`` / ``load_state_dict``).
  torch's first ``scheduler.step()`` warns that ``optimizer.step()`` was not called: it only
  sees calls of ``step()``; the schedule is not shifted (tested).
- **Non-finite gradients**: the optimizer's ``nonfinite`` policy applies per parameter, as in
  ``optimizer.step()`` (skip and count, or raise out of ``backward``).
- The step is the optimizer's own single-process step (``optimizer.step_params``): the same
  maths as ``optimizer.step()``, one parameter (under DDP one bucket) at a time.
- **DDP** (``ddp=`` the ``DistributedDataParallel`` module): a parameter must step on the
  gradient averaged over the ranks, which exists only after DDP's all-reduce, later than the
  parameter's own hook. So the step moves into a DDP communication hook
  (``ddp.register_comm_hook``; DDP takes one per module): it averages the bucket (divide by the
  world size, all-reduce; DDP's own arithmetic) and steps the bucket's parameters on it, then
  frees their ``.grad``; DDP is told not to copy the bucket back into ``.grad`` (the reducer's
  ``_set_optimizer_in_backward``, what torch's own ``_apply_optimizer_in_backward`` uses).
  The step runs in the hook, on the autograd thread, after waiting for the reduction (on CUDA
  a stream wait): in bucket order, deterministic, and never on a communication thread.
  Accumulation: run the first ``accumulation_steps - 1`` micro-batches under
  ``ddp.no_sync()`` (forward and backward), as with ordinary DDP; the hook checks that each
  parameter saw exactly ``accumulation_steps`` backward passes and raises otherwise (a missing
  ``no_sync`` would step at every micro-batch). DDP's gradient buckets stay allocated (one
  full-size copy of the gradients, DDP's own); what is freed is each parameter's ``.grad``
  (with ``gradient_as_bucket_view=True`` the two are the same memory). A parameter DDP reduces
  that the optimizer does not hold gets the averaged gradient in ``.grad`` as DDP would give
  it; so does every parameter after ``remove()`` (the hook stays, as DDP cannot drop it).
- **Refused** (``ValueError`` naming what works): an optimizer that is not slimopt's, AdaPreLoRA's
  LoRA pairs (a pair steps as a unit), an optimizer with an engine bridge (DeepSpeed ZeRO, FSDP2),
  a multi-process run without ``ddp=``, and DDP with ``find_unused_parameters=True`` (an unused
  parameter would step on a zero gradient where ``optimizer.step()`` skips it). Call
  ``optimizer.step()`` there.
"""
from __future__ import annotations

import torch

from .optimizers.core.base import SlimOptimizer


class StepInBackward:
    """The hooks ``step_in_backward`` registered: ``remove()`` takes them off; ``stepped`` says
    whether the last backward pass stepped a parameter (the last micro-batch of a step);
    ``take_grad_norm()`` reads the norm of the gradients stepped since its previous call."""

    def __init__(self, optimizer: SlimOptimizer, accumulation_steps: int, max_grad_norm,
                 ddp=None):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.ddp = ddp
        self.stepped = False
        self._counts: dict[int, int] = {}
        self._group_of = {id(p): group for group in optimizer.param_groups
                          for p in group["params"] if p.requires_grad}
        #: sum of the squared norms of the gradients stepped since take_grad_norm() (a running
        #: sum, not a list: a run that never reads it must not grow a tensor per step)
        self._square_norm: torch.Tensor | None = None
        if ddp is not None:
            self._world = torch.distributed.get_world_size(ddp.process_group)
            try:
                ddp.register_comm_hook(self, _average_then_step)
            except RuntimeError:
                raise ValueError("step_in_backward: this DDP module already has a communication "
                                 "hook (DDP takes one per module: another step_in_backward, or "
                                 "your own); wrap the model in a new DistributedDataParallel"
                                 ) from None
            ddp.reducer._set_optimizer_in_backward()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for group in optimizer.param_groups for p in group["params"]
                         if p.requires_grad]

    def _on_gradient(self, p: torch.Tensor) -> None:
        """A parameter's gradient of this backward pass is accumulated into ``.grad``."""
        count = self._counts.get(id(p), 0) + 1
        if count < self.accumulation_steps:
            self.stepped = False
        if count < self.accumulation_steps or self.ddp is not None:
            self._counts[id(p)] = count  # under DDP the averaged gradient steps it, in the hook
            return
        self._counts[id(p)] = 0
        self._step([p])

    def _step(self, params: list) -> None:
        """Clip each gradient on its own, step ``params`` (one call per param group) and free
        their gradients."""
        by_group: dict[int, list] = {}
        with torch.no_grad():
            for p in params:
                norm = (torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
                        if self.max_grad_norm is not None else torch.linalg.vector_norm(p.grad))
                square = norm.float().square()
                self._square_norm = square if self._square_norm is None else \
                    self._square_norm + square.to(self._square_norm.device)
                by_group.setdefault(id(self._group_of[id(p)]), []).append(p)
            for group_params in by_group.values():
                group = self._group_of[id(group_params[0])]
                self.optimizer.step_params(dict(group, params=group_params))
        for p in params:
            p.grad = None
        self.stepped = True

    def _reduced(self, params: list, grads: list) -> None:
        """DDP averaged a bucket: ``grads`` are its views, one per parameter of ``params``."""
        mine = []
        for p, g in zip(params, grads):
            if not self._handles or id(p) not in self._group_of:
                _give_gradient(p, g)  # what DDP would have written into .grad
                continue
            count = self._counts.get(id(p), 0)
            if count != self.accumulation_steps:
                raise RuntimeError(
                    f"step_in_backward(ddp=...): DDP averaged the gradients after {count} "
                    f"backward pass(es) of a parameter of shape {tuple(p.shape)}, but "
                    f"accumulation_steps is {self.accumulation_steps}: run the first "
                    f"{self.accumulation_steps - 1} micro-batches of each step under "
                    "ddp.no_sync() and the last without it")
            self._counts[id(p)] = 0
            p.grad = g
            mine.append(p)
        if mine:
            self._step(mine)

    def take_grad_norm(self) -> torch.Tensor | None:
        """The L2 norm of all gradients stepped since the previous call (before clipping; under
        DDP the averaged ones), or None if none stepped; starts a new count."""
        if self._square_norm is None:
            return None
        norm, self._square_norm = self._square_norm.sqrt(), None
        return norm

    def remove(self) -> None:
        """Take the hooks off (the optimizer steps with ``optimizer.step()`` again; under DDP the
        communication hook stays and only averages, as DDP does without one)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _give_gradient(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Set ``p.grad`` to the averaged ``grad`` (a view of DDP's bucket), as DDP's reducer would."""
    if p.grad is None:
        p.grad = grad.clone(memory_format=torch.contiguous_format)
    elif p.grad.data_ptr() != grad.data_ptr():
        p.grad.copy_(grad)


def _average_then_step(handle, bucket):  # unannotated: DDP checks annotations by value
    """The DDP communication hook: average the bucket over the ranks (divide, then all-reduce,
    as DDP's default hook does), then step its parameters on it (``StepInBackward._reduced``);
    returns the completed future DDP expects."""
    buffer = bucket.buffer()
    buffer.div_(handle._world)
    torch.distributed.all_reduce(buffer, group=handle.ddp.process_group)
    handle._reduced(bucket.parameters(), bucket.gradients())
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


def _check_ddp(ddp) -> None:
    """``ddp`` must be a ``DistributedDataParallel`` module the hook can work with."""
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"step_in_backward: ddp must be the torch.nn.parallel."
                         f"DistributedDataParallel module, got {type(ddp).__name__}")
    if ddp.find_unused_parameters:
        raise ValueError("step_in_backward: DDP with find_unused_parameters=True is not "
                         "supported (an unused parameter would step on a zero gradient); wrap "
                         "the model with find_unused_parameters=False or call optimizer.step()")
    if not hasattr(ddp.reducer, "_set_optimizer_in_backward"):
        raise ValueError("step_in_backward: this torch's DDP reducer lacks "
                         "_set_optimizer_in_backward; call optimizer.step() after backward")


def step_in_backward(optimizer, accumulation_steps: int = 1,
                     max_grad_norm: float | None = None, ddp=None) -> StepInBackward:
    """Step every parameter of ``optimizer`` during backward, as soon as its gradient is final
    (module docstring); under DDP pass the ``DistributedDataParallel`` module as ``ddp``.
    Returns the handle (``.remove()``, ``.stepped``, ``.take_grad_norm()``)."""
    if not isinstance(optimizer, SlimOptimizer):
        raise ValueError(f"step_in_backward takes a slimopt optimizer, got "
                         f"{type(optimizer).__name__}; for torch's own optimizers see torch's "
                         "'optimizer step in backward' recipe (register_post_accumulate_grad_hook)")
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) \
            or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                          and not isinstance(max_grad_norm, bool)
                                          and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    if optimizer.step_router is not None:
        raise ValueError(f"step_in_backward: this {type(optimizer).__name__} is bridged to a "
                         "sharding engine (DeepSpeed ZeRO or FSDP2), which steps the parameters "
                         "itself; call optimizer.step() (engine.step() under DeepSpeed)")
    pairs = getattr(optimizer, "is_pair", None)
    if pairs is not None and any(pairs(g) for g in optimizer.param_groups):
        raise ValueError("step_in_backward: AdaPreLoRA steps each LoRA pair as a unit, which a "
                         "per-parameter hook cannot; call optimizer.step()")
    if ddp is not None:
        _check_ddp(ddp)
    elif torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("step_in_backward: in a multi-process run pass the "
                         "DistributedDataParallel module as ddp= (the step must wait for its "
                         "all-reduce); under ZeRO or FSDP2 call optimizer.step()")
    return StepInBackward(optimizer, accumulation_steps, max_grad_norm, ddp)
