"""One training step of ``slimopt-pretrain`` and the evaluation, for a ``run_setup.Run``.

``plain_step`` (single process and DDP): the rank's rows as ``--grad-accum`` micro-batches
(``forward_backward``: bf16 autocast, loss / N, DDP's all-reduce only at the last), clip,
optimizer step, schedule step. ``InBackwardStep`` (``--step-in-backward``): the same micro-batches,
the optimizer stepping inside the last backward (``slimopt.step_in_backward``), then the schedule.
``deepspeed_step``: the rank's rows as micro-batches through the engine, which accumulates, clips,
steps and schedules. Each returns ``(loss, grad_norm)``."""
from __future__ import annotations

import contextlib
import warnings

import torch

from .batch_order import batch_at
from ..step_in_backward import step_in_backward
from .train_config import DEFAULT_GRAD_CLIP, UsageError


def rank_rows(run, step) -> torch.Tensor:
    """This rank's share of the global batch of ``step`` (the same on every run and resume)."""
    args = run.args
    rows = args.batch_size // run.world
    batch = batch_at(run.train_blocks, step, args.batch_size, args.seed)
    return batch[run.rank * rows:(run.rank + 1) * rows].to(run.device)


def grad_clip(args) -> float:
    """``--grad-clip`` (its default when not given; 0: no clipping)."""
    return args.grad_clip if args.grad_clip is not None else DEFAULT_GRAD_CLIP


def forward_backward(run, ids) -> torch.Tensor:
    """Forward and backward of ``ids`` in ``--grad-accum`` equal micro-batches, each loss scaled
    by 1/N (the gradients sum to the whole batch's mean); under DDP the first N-1 under
    ``no_sync()``, so the gradients are averaged over the ranks once, at the last. Returns the
    mean of the micro-batch losses (the whole batch's loss: the micro-batches have equal token
    counts)."""
    n = run.args.grad_accum
    ddp = run.train_model if isinstance(run.train_model,
                                        torch.nn.parallel.DistributedDataParallel) else None
    total = 0.0
    for i, part in enumerate(ids.chunk(n)):
        with ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext():
            with run.autocast():
                loss = run.train_model(input_ids=part, labels=part).loss
            (loss / n).backward()
        total = total + loss.detach()
    return total / n


def plain_step(run, ids, step):
    loss = forward_backward(run, ids)
    clip = grad_clip(run.args)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.model.parameters(), clip if clip > 0 else float("inf"))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    return loss, grad_norm


class InBackwardStep:
    """``--step-in-backward``: ``slimopt.step_in_backward`` on the run's optimizer (under DDP on
    its ``DistributedDataParallel`` module), stepping in the backward of each step's last
    micro-batch, ``--grad-clip`` clipping each parameter's gradient on its own.

    The step's ``grad_norm`` is the global norm of the (averaged) gradients before clipping,
    summed from each parameter's norm in the hooks: the number ``clip_grad_norm_`` reports in
    ``plain_step``. Evaluation runs without gradients, so no hook fires there. A non-finite
    gradient is skipped per parameter by the optimizer's ``nonfinite`` policy (``plain_step``'s
    global clip spreads a NaN norm to every gradient, so all are skipped there)."""

    def __init__(self, run):
        clip = grad_clip(run.args)
        ddp = run.train_model if isinstance(run.train_model,
                                            torch.nn.parallel.DistributedDataParallel) else None
        try:
            self.handle = step_in_backward(run.opt, accumulation_steps=run.args.grad_accum,
                                           max_grad_norm=clip if clip > 0 else None, ddp=ddp)
        except ValueError as err:
            raise UsageError(f"--step-in-backward: {err}") from None

    def __call__(self, run, ids, step):
        loss = forward_backward(run, ids)
        if not self.handle.stepped:
            raise RuntimeError(f"step {step + 1}: --step-in-backward: no parameter stepped in "
                               "the last backward")
        with warnings.catch_warnings():  # the optimizer stepped, but not through its step()
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            run.sched.step()
        norm = self.handle.take_grad_norm()
        return loss, norm


def deepspeed_step(run, ids, step):
    engine = run.engine
    micro = engine.train_micro_batch_size_per_gpu()
    for a in range(engine.gradient_accumulation_steps()):
        part = ids[a * micro:(a + 1) * micro]
        loss = engine(input_ids=part, labels=part).loss
        engine.backward(loss)
        engine.step()
    grad_norm = engine.get_global_grad_norm() or 0.0
    if not engine.was_step_applied():  # DeepSpeed's own skip: never a silent one
        run.say(f"step {step + 1}: DeepSpeed discarded the update (non-finite gradient "
                f"norm); {engine.skipped_steps} discarded so far")
    return loss, grad_norm


def train_step_for(run):
    """``deepspeed_step`` when the run has an engine, an ``InBackwardStep`` with
    ``--step-in-backward``, else ``plain_step``."""
    if run.engine is not None:
        return deepspeed_step
    return InBackwardStep(run) if run.args.step_in_backward else plain_step


@torch.no_grad()
def evaluate(run) -> float:
    """Mean loss over up to ``--eval-batches`` held-out batches, on this rank."""
    model, blocks, args = run.model, run.eval_blocks, run.args
    model.eval()
    losses = []
    n = min(args.eval_batches, max(1, len(blocks) // args.batch_size))
    for i in range(n):
        ids = blocks[i * args.batch_size:(i + 1) * args.batch_size].long().to(run.device)
        with run.autocast():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    return sum(losses) / len(losses)
