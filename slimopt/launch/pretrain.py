"""``slimopt-pretrain``: pretrain a LLaMA-style model from scratch with any slimopt optimizer or a
peer, single process or under torchrun (DDP), offline by default.

    slimopt-pretrain --preset tiny                          # GrassWalk on the stdlib corpus
    slimopt-pretrain --preset tiny --optimizer adamw
    torchrun --nproc_per_node 2 -m slimopt.launch.pretrain --preset tiny
    slimopt-pretrain --preset 60m --data corpus.jsonl --optimizer grassjump --rank 128

What it does: a ``transformers.LlamaForCausalLM`` of the preset's shape; data through
``slimopt.launch.data`` (default: the Python standard library's source, byte-level BPE trained by
``tokenizers`` on first use and cached); cosine schedule with linear warmup down to
``--min-lr-ratio``; gradient clipping; bf16 autocast where the hardware has it; TensorBoard logs
(loss, eval perplexity, lr, gradient norm, tokens/s, optimizer-state bytes, subspace movement and
recovery norms) under ``OUTPUT/tb``; a progress bar; checkpoints every ``--save-every`` steps
holding model, optimizer, schedule, RNG and the data position, so ``--resume`` continues without
repeating or skipping a batch. At the end it prints the eval perplexity and the optimizer-state
bytes next to what AdamW would hold, and writes them to ``OUTPUT/result.json`` with the loss
curve (``curve``: step, tokens, mean train loss since the previous point and eval loss at every
``--eval-every`` evaluation and the last step).

Memory (issue 13), each recorded in the checkpoint:

- ``--grad-accum N``: each rank's share of ``--batch-size`` runs as N micro-batches (loss / N,
  one backward each; under DDP the first N-1 under ``no_sync()``), one optimizer step; the
  batch of a step is the same rows whatever N, so a resume may change N. ``--batch-size`` must
  divide by ranks x N. With ``--deepspeed`` it is the config's ``gradient_accumulation_steps``
  (a JSON that sets another is refused).
- ``--activation-checkpointing``: each decoder layer's activations are recomputed in backward
  (transformers' checkpointing, non-reentrant): the same gradients, less activation memory.
- ``--step-in-backward``: each parameter steps inside the backward of the step's last
  micro-batch and its gradient is freed (``slimopt.step_in_backward``; under DDP through its
  communication hook). ``--grad-clip`` then clips each parameter's gradient on its own; the
  logged gradient norm is still the global norm before clipping. slimopt optimizers only, not
  with ``--deepspeed``.
- ``--state-dtype float32|bfloat16|int8``: the slimopt optimizer's moments (refused for the
  peers, and by DeepSpeed ZeRO-1/2/3, whose bridge keeps float32 moments); a resume must keep
  it.

Every user error (missing data, unknown preset or optimizer, a bad or mismatched checkpoint) is a
one-line message and exit code 2, not a traceback.

The parts, one module each under ``slimopt.launch``: ``train_config`` (the arguments and their
checks), ``deepspeed_config`` (the ``--deepspeed`` JSON), ``run_setup`` (process group, data,
model, optimizer, schedule, DDP or DeepSpeed: a ``Run``), ``checkpointer`` (``save(step)`` and
``load()``, plain or DeepSpeed), ``train_step`` (one step, plain or DeepSpeed, and the
evaluation) and ``run_logger`` (TensorBoard, progress, loss curve, result). ``train`` below is the
loop over them.
"""
from __future__ import annotations

import sys

import torch

from .checkpoint_io import CheckpointError, RunLock, check_writable_dir
from .checkpointer import make_checkpointer
from .data import DataError
from .resume import ResumeError
from .run_logger import RunLogger
from .run_setup import all_mean, build_run, setup_distributed
from .train_config import UsageError, build_parser, validate
from .train_step import evaluate, rank_rows, train_step_for

__all__ = ["parse_args", "run", "train", "execute", "main", "UsageError"]


def parse_args(argv=None):
    """The run's settings from ``argv``: checked, with the preset's defaults filled in."""
    parser = build_parser(description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    validate(args, argv, parser.error)
    return args


def run(args):
    """Set up the processes and folders, then ``train`` (holding the output folder's lock)."""
    rank, world, device = setup_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = world * (args.grad_accum or 1)  # with --deepspeed, its config is checked later
    if args.batch_size % parts:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} "
                         f"rank(s) x --grad-accum {args.grad_accum or 1} micro-batches; pass a "
                         f"multiple of {parts}")
    # unusable folders are found now, not at the first save after hours of training
    check_writable_dir(args.cache_dir, "--cache-dir")
    check_writable_dir(args.output_dir, "--output-dir")
    lock = RunLock(args.output_dir) if rank == 0 else None
    try:
        return train(args, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def train(args, rank, world, device) -> dict:
    """The training loop: build the run, resume it, step, log, evaluate, checkpoint, report."""
    run = build_run(args, rank, world, device)
    checkpointer = make_checkpointer(run)
    start = checkpointer.load()
    logger = RunLogger(run, start)
    train_step = train_step_for(run)
    done = start
    for step in range(start, args.steps):
        ids = rank_rows(run, step)
        loss, grad_norm = train_step(run, ids, step)
        done = step + 1
        logger.log_step(done, all_mean(float(loss.detach()), world, device), grad_norm,
                        ids.numel() * world)
        if done % args.eval_every == 0 or done == args.steps:
            logger.log_eval(done, all_mean(evaluate(run), world, device))
        checkpointer.save(done)
        if args.halt_after and done >= args.halt_after:
            run.say(f"halted after step {done} (--halt-after)")
            break
    logger.close()
    if logger.eval_loss is None:  # halted before the first evaluation
        logger.add_point(done, all_mean(evaluate(run), world, device))
    return logger.report()


def execute(argv=None) -> dict:
    """Parse ``argv``, train, and return the result dict (``SystemExit(2)`` on user errors)."""
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError, CheckpointError, ResumeError) as err:
        print(f"slimopt-pretrain: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    """The console script: exit code 0 on success."""
    execute(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
