"""One training step of ``slimopt-pretrain`` and the evaluation, for a ``run_setup.Run``.

``plain_step`` (single process and DDP): forward under bf16 autocast, backward, clip, optimizer
step, schedule step. ``deepspeed_step``: the rank's rows as micro-batches through the engine,
which accumulates, clips, steps and schedules. Both return ``(loss, grad_norm)``."""
from __future__ import annotations

import torch

from .data import batch_at
from .train_config import DEFAULT_GRAD_CLIP


def rank_rows(run, step) -> torch.Tensor:
    """This rank's share of the global batch of ``step`` (the same on every run and resume)."""
    args = run.args
    rows = args.batch_size // run.world
    batch = batch_at(run.train_blocks, step, args.batch_size, args.seed)
    return batch[run.rank * rows:(run.rank + 1) * rows].to(run.device)


def plain_step(run, ids, step):
    with run.autocast():
        loss = run.train_model(input_ids=ids, labels=ids).loss
    loss.backward()
    clip = run.args.grad_clip if run.args.grad_clip is not None else DEFAULT_GRAD_CLIP
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.model.parameters(), clip if clip > 0 else float("inf"))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    return loss, grad_norm


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
    """``deepspeed_step`` when the run has an engine, else ``plain_step``."""
    return deepspeed_step if run.engine is not None else plain_step


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
