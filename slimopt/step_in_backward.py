"""Optimizer steps fused into the backward pass: each parameter steps as soon as its gradient is
final, and its gradient is freed at once, so the full-size gradients of a model are never all
alive together (GaLore's ``*_per_layer``, done for every slimopt optimizer).

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
  whole; it is what changes against ordinary steps, and it is tested.
- **Schedulers and checkpoints** work as with ordinary steps: a step reads its group's ``lr``
  when it runs, and the optimizer's state is its own (``state_dict`` / ``load_state_dict``).
- The step is the optimizer's own single-process step of that parameter
  (``optimizer.step_params``): the same maths as ``optimizer.step()``, one matrix at a time (the
  batching of same-shape matrices is given up).
- **Refused** (``ValueError`` naming what works): an optimizer that is not slimopt's, AdaPreLoRA's
  LoRA pairs (a pair steps as a unit), an optimizer with an engine bridge (DeepSpeed ZeRO, FSDP2),
  and a multi-process run (``torch.distributed`` initialized with more than one rank: DDP reduces
  gradients after these hooks fire). Call ``optimizer.step()`` there.
"""
from __future__ import annotations

import torch

from .optimizers.core.base import SlimOptimizer


class StepInBackward:
    """The hooks ``step_in_backward`` registered: ``remove()`` takes them off; ``stepped`` says
    whether the last backward pass stepped a parameter (the last micro-batch of a step)."""

    def __init__(self, optimizer: SlimOptimizer, accumulation_steps: int, max_grad_norm):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.stepped = False
        self._counts: dict[int, int] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        self._hook_for(group)))

    def _hook_for(self, group: dict):
        def hook(p: torch.Tensor) -> None:
            count = self._counts.get(id(p), 0) + 1
            if count < self.accumulation_steps:
                self._counts[id(p)] = count
                self.stepped = False
                return
            self._counts[id(p)] = 0
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            self.optimizer.step_params(dict(group, params=[p]))
            p.grad = None
            self.stepped = True
        return hook

    def remove(self) -> None:
        """Take the hooks off (the optimizer steps with ``optimizer.step()`` again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def step_in_backward(optimizer, accumulation_steps: int = 1,
                     max_grad_norm: float | None = None) -> StepInBackward:
    """Step every parameter of ``optimizer`` during backward, as soon as its gradient is final
    (module docstring). Returns the handle (``.remove()``, ``.stepped``)."""
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
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("step_in_backward works in one process: under DDP the gradients are "
                         "reduced after a parameter's hook fires, so it would step on the local "
                         "gradient; call optimizer.step() after backward")
    return StepInBackward(optimizer, accumulation_steps, max_grad_norm)
