"""Checkpoints of a ``slimopt-pretrain`` run, one interface whatever the engine:
``save(step)`` writes one when it is due, ``load()`` continues ``--resume`` and returns the step to
start from.

- ``PlainCheckpointer`` (single process and DDP): ``OUTPUT/checkpoint-N.pt`` and
  ``checkpoint-latest.pt``, each written atomically with a digest (``checkpoint_io``) by rank 0,
  holding model, optimizer, schedule, RNG, the data position and the run settings (``resume``).
- ``DeepSpeedCheckpointer``: DeepSpeed's own tag folders ``OUTPUT/deepspeed/stepN`` with per-rank
  digests; every file is checked before DeepSpeed reads it (``safe_load.check_deepspeed_tag``),
  and a ZeRO checkpoint written at another world size is merged (``zero_checkpoint``).
"""
from __future__ import annotations

import glob
import os

import torch

from .cli_errors import first_line
from .checkpoint_io import (CheckpointError, load_verified, save_atomic, verify_tag_digests,
                            write_tag_digests)
from .resume import apply_schedule, check_position, check_settings, run_settings
from .train_config import UsageError

#: 2: a SHA-256 digest in every file and every run setting recorded (version 1 still loads)
CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = ("step", "data_position", "model", "optimizer", "scheduler", "rng", "args")


def make_checkpointer(run):
    """The checkpointer for ``run`` (a ``run_setup.Run``): DeepSpeed's when it has an engine."""
    return (DeepSpeedCheckpointer if run.engine is not None else PlainCheckpointer)(run)


class Checkpointer:
    """What both kinds share: when a save is due, and the resume protocol (read, check the
    settings and position, restore, re-apply the schedule)."""

    def __init__(self, run):
        self.run = run
        self.args = run.args

    def due(self, step) -> bool:
        """Every ``--save-every`` steps, and at the last step."""
        args = self.args
        return bool(args.save_every and step % args.save_every == 0 or step == args.steps)

    def load(self) -> int:
        """Continue from ``--resume``: returns the step to start from (0: a fresh start)."""
        args, say = self.args, self.run.say
        if not args.resume:
            return 0
        if args.resume == "auto" and self.latest() is None:
            say(f"--resume auto: no checkpoint under {args.output_dir} yet; starting from step 0")
            return 0
        saved, step, state = self.read()
        for note in check_settings(saved, args, args.resume):
            say(f"--resume: {note}")
        step = check_position(step, args, args.resume)
        self.restore(state)
        apply_schedule(self.run.sched, saved.get("lr") if isinstance(saved, dict) else None,
                       args.lr)
        say(f"resumed from step {step}")
        return step


# ---------------------------------------------------------------------------- plain .pt files
class PlainCheckpointer(Checkpointer):

    def latest(self):
        """``--resume auto``: the run's latest checkpoint, or None when it has none yet."""
        path = os.path.join(self.args.output_dir, "checkpoint-latest.pt")
        return path if os.path.exists(path) else None

    def save(self, step) -> None:
        """On rank 0, when due: the step's checkpoint and ``checkpoint-latest.pt``."""
        if self.run.is_main and self.due(step):
            run = self.run
            save_checkpoint(os.path.join(self.args.output_dir, f"checkpoint-{step}.pt"),
                            run.model, run.opt, run.sched, step, self.args, run.world)

    def read(self):
        path = self.latest() if self.args.resume == "auto" else self.args.resume
        ckpt = load_checkpoint(path, self.args)
        return ckpt["args"], ckpt["step"], ckpt

    def restore(self, ckpt) -> None:
        run = self.run
        try:
            run.model.load_state_dict(ckpt["model"])
            run.opt.load_state_dict(ckpt["optimizer"])
            run.sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = first_line(err)
            raise UsageError(f"--resume {self.args.resume}: its state does not fit this run "
                             f"({first})") from None


def save_checkpoint(path, model, opt, sched, step, args, world):
    """The step's checkpoint and ``checkpoint-latest.pt``, each written atomically with a digest."""
    payload = {"version": CHECKPOINT_VERSION, "step": step, "data_position": step,
               "model": model.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
               "args": run_settings(args), "world_size": world}
    latest = os.path.join(os.path.dirname(path), "checkpoint-latest.pt")
    same = os.path.abspath(latest) == os.path.abspath(path)
    save_atomic(payload, *([path] if same else [path, latest]))


def load_checkpoint(path, args):
    """A verified ``slimopt-pretrain`` checkpoint this run may continue (see ``resume``)."""
    try:
        ckpt = load_verified(path)
    except CheckpointError as err:
        raise UsageError(f"--resume {err}") from None
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise UsageError(f"--resume {path}: not a slimopt-pretrain checkpoint (version "
                         f"{ckpt.get('version')!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"--resume {path}: incomplete checkpoint (no {', '.join(missing)})")
    if ckpt["data_position"] != ckpt["step"]:
        raise UsageError(f"--resume {path}: data position {ckpt['data_position']!r} differs "
                         f"from step {ckpt['step']!r}")
    check_position(ckpt["step"], args, path)
    if ckpt["sha256"] is None:
        print(f"note: {path} carries no digest (written by an older slimopt): not verified")
    return ckpt


# ---------------------------------------------------------------------------- DeepSpeed tags
class DeepSpeedCheckpointer(Checkpointer):

    def latest(self):
        """``--resume auto``: the run's DeepSpeed folder, or None when it has no checkpoint."""
        folder = os.path.join(self.args.output_dir, "deepspeed")
        return folder if os.path.isfile(os.path.join(folder, "latest")) else None

    def save(self, step) -> None:
        """On every rank, when due: the tag ``stepN`` and this rank's digests."""
        if self.due(step):
            save_deepspeed_checkpoint(self.run.engine, self.args, step)

    def read(self):
        client = load_deepspeed_checkpoint(self.run.engine, self.args)
        return client["args"], client["data_position"], None

    def restore(self, state) -> None:
        """Nothing left to do: DeepSpeed loaded the state into the engine in ``read``."""


def _read_latest(folder) -> str:
    latest = os.path.join(folder, "latest")
    if not os.path.isfile(latest):
        raise UsageError(f"{folder} has no 'latest' file: pass the tag folder to --resume")
    with open(latest) as f:
        return f.read().strip()


def _zero_checkpoint_world(folder, tag):
    """The number of ranks that wrote a ZeRO-1/2/3 checkpoint (0 for ZeRO-0 or none)."""
    tag = tag or _read_latest(folder)
    return len(glob.glob(os.path.join(folder, tag, "*_optim_states.pt")))


def save_deepspeed_checkpoint(engine, args, step) -> None:
    folder = os.path.join(args.output_dir, "deepspeed")
    try:
        engine.save_checkpoint(folder, tag=f"step{step}",
                               client_state={"data_position": step, "args": run_settings(args)})
    except (OSError, RuntimeError) as err:
        first = first_line(err)
        raise CheckpointError(f"could not write the DeepSpeed checkpoint under {folder} "
                              f"({first})") from None
    write_tag_digests(os.path.join(folder, f"step{step}"), engine.global_rank)


def _deepspeed_source(args):
    """``(folder, tag)`` of ``--resume`` for a DeepSpeed run (tag None: the folder's latest)."""
    if args.resume == "auto":
        return os.path.join(args.output_dir, "deepspeed"), None
    path = os.path.normpath(args.resume)
    return os.path.dirname(path), os.path.basename(path)


def load_deepspeed_checkpoint(engine, args):
    """Load a DeepSpeed checkpoint into ``engine`` (every file checked first, see
    ``safe_load.check_deepspeed_tag``); return its client state."""
    from .safe_load import check_deepspeed_tag
    folder, tag = _deepspeed_source(args)
    if not os.path.isdir(folder):
        raise UsageError(f"--resume {args.resume}: no DeepSpeed checkpoint folder {folder}")
    try:
        check_deepspeed_tag(folder, tag)
        tag_dir = os.path.join(folder, tag or _read_latest(folder))
        if not verify_tag_digests(tag_dir):
            print(f"note: {tag_dir} carries no digests (written by an older slimopt or by "
                  "DeepSpeed directly): not verified")
    except ValueError as err:
        raise UsageError(f"--resume {args.resume}: {err}") from None
    saved_world = _zero_checkpoint_world(folder, tag)
    try:
        if saved_world and saved_world != engine.dp_world_size:
            # written at another world size: merge the ranks' states (slimopt's own format)
            from .zero_checkpoint import load_resharded
            path, client = folder, load_resharded(engine, folder, tag)
        else:
            path, client = engine.load_checkpoint(folder, tag=tag)
    except Exception as err:
        first = first_line(err, "no message")
        raise UsageError(f"--resume {args.resume}: DeepSpeed could not load it "
                         f"({type(err).__name__}: {first})") from None
    if path is None or not client:
        raise UsageError(f"--resume {args.resume}: no checkpoint found")
    missing = [k for k in ("data_position", "args") if k not in client]
    if missing:
        raise UsageError(f"--resume {args.resume}: incomplete checkpoint (no "
                         f"{', '.join(missing)})")
    return client
