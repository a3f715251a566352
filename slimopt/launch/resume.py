"""What a resumed ``slimopt-pretrain`` run may change, and what it must share with its checkpoint.

- ``MUST_MATCH``: settings that decide the model, the data, the batch order or the optimizer's
  algorithm. A resumed run that differs in any of them is refused, naming each difference. The
  data is compared by content (SHA-256 of the documents used, and of the tokenizer), not only by
  path, so a file changed behind the same name is noticed.
- ``APPLIED``: settings a resumed run may change; each change is applied from the resume step on
  and printed. ``--lr`` rescales every group's base learning rate by new/old (groups keep their
  ratios); ``--steps``, ``--warmup`` and ``--min-lr-ratio`` reshape the rest of the schedule;
  ``--grad-clip`` clips from the next step. ``--grad-accum``, ``--activation-checkpointing`` and
  ``--step-in-backward`` change how a step's gradient is formed and applied, not which rows it
  sees (a step's rows stay the same function of the step) nor the optimizer's state, so
  they may change too (``--step-in-backward`` clips per parameter from then on).
  ``--state-dtype`` is in ``MUST_MATCH``: the moments are stored in it.
"""
from __future__ import annotations

MUST_MATCH = ("preset", "optimizer", "seq_len", "batch_size", "vocab_size", "data", "text_column",
              "seed", "max_chars", "rank", "update_interval", "weight_decay", "opt_args",
              "data_sha256", "tokenizer_sha256", "state_dtype")
APPLIED = ("lr", "steps", "warmup", "min_lr_ratio", "grad_clip", "grad_accum",
           "activation_checkpointing", "step_in_backward")


class ResumeError(ValueError):
    """A checkpoint this run cannot continue; the CLI reports it in one line."""


def run_settings(args) -> dict:
    """The settings a checkpoint records."""
    return {k: getattr(args, k) for k in MUST_MATCH + APPLIED}


def check_settings(saved: dict, args, source: str) -> list[str]:
    """Refuse a differing ``MUST_MATCH`` setting; return one line per applied change (and per
    setting an older checkpoint did not record)."""
    if not isinstance(saved, dict):
        raise ResumeError(f"--resume {source}: the checkpoint records no run settings")
    differ = [f"{k}: checkpoint {saved[k]!r}, now {getattr(args, k)!r}"
              for k in MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
    if differ:
        raise ResumeError(f"--resume {source}: the run's settings differ from the checkpoint's ("
                          + "; ".join(differ) + "); start a new --output-dir to change them")
    notes = [f"--{k.replace('_', '-')} changed from {saved[k]!r} to {getattr(args, k)!r}: "
             "applied from the resume step on"
             for k in APPLIED if k in saved and saved[k] != getattr(args, k)]
    unchecked = [k for k in MUST_MATCH + APPLIED if k not in saved]
    if unchecked:
        notes.append(f"the checkpoint does not record {', '.join(unchecked)} (written by an "
                     "older slimopt): not checked")
    return notes


def check_position(step, args, source: str) -> int:
    """The checkpoint's step, which must be a whole number in ``[0, --steps]``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ResumeError(f"--resume {source}: invalid step/data position {step!r}")
    if step > args.steps:
        raise ResumeError(f"--resume {source}: the checkpoint is at step {step}, beyond --steps "
                          f"{args.steps}; pass --steps {step} or more")
    return step


def apply_schedule(sched, saved_lr, new_lr) -> None:
    """After loading optimizer and scheduler state: rescale the base learning rates by
    ``new_lr / saved_lr`` and set each group's lr from the (possibly changed) schedule at the
    current step. With nothing changed this recomputes exactly the lr the scheduler holds."""
    ratio = new_lr / saved_lr if saved_lr not in (None, new_lr) else None
    for i, group in enumerate(sched.optimizer.param_groups):
        if ratio is not None:
            sched.base_lrs[i] = sched.base_lrs[i] * ratio
            group["initial_lr"] = sched.base_lrs[i]
        group["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
