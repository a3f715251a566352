"""``slimopt-pretrain``'s command line: the table of its arguments, the preset defaults they fall
back to, and the checks a run's settings must pass before anything is loaded."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .cli_errors import OneLineParser
from .presets import PRESETS
from .records import BY_NAME
from .registry import KNOWN

DEFAULT_GRAD_CLIP = 1.0
STATE_DTYPES = ("float32", "bfloat16", "int8")


class UsageError(Exception):
    """Reported as ``slimopt-pretrain: error: ...`` with exit code 2."""


#: every argument, in ``--help`` order: (flag, argparse keyword arguments)
ARGUMENTS = (
    ("--preset", dict(default="tiny", help=f"model preset: {', '.join(PRESETS)}")),
    ("--optimizer", dict(default="grasswalk", help=f"one of {sorted(KNOWN)}")),
    ("--opt-args", dict(default="{}", help="extra optimizer keyword arguments as JSON")),
    ("--lr", dict(type=float)),
    ("--rank", dict(type=int, help="subspace rank (ranked optimizers)")),
    ("--update-interval", dict(type=int)),
    ("--weight-decay", dict(type=float, default=0.0)),
    ("--steps", dict(type=int)),
    ("--batch-size", dict(type=int, help="global batch, in sequences")),
    ("--seq-len", dict(type=int)),
    ("--warmup", dict(type=int)),
    ("--min-lr-ratio", dict(type=float, default=0.1)),
    ("--grad-clip", dict(type=float, help="0 disables clipping (default 1.0)")),
    ("--data", dict(help="local .txt/.json/.jsonl/.parquet file or folder, a hub dataset "
                         "name, or 'fortunes' (built in: English prose from Debian's fortunes "
                         "package, apt-get install fortunes); default: the Python stdlib "
                         "source")),
    ("--text-column", dict(default="text")),
    ("--vocab-size", dict(type=int, help="the trained BPE's vocabulary (default: the "
                                         "preset's); with --tokenizer, the tokenizer's")),
    ("--tokenizer", dict(help="a pretrained tokenizer instead of the trained BPE: a "
                              "tokenizer.json, a save_pretrained folder, or a name already in "
                              "the Hugging Face cache (never downloaded)")),
    ("--max-chars", dict(type=int, help="characters of the corpus to use (default: the "
                                        "preset's); the run says when it cuts the corpus")),
    ("--eval-every", dict(type=int)),
    ("--eval-batches", dict(type=int, default=8)),
    ("--save-every", dict(type=int, default=0, help="checkpoint period (0: at the end)")),
    ("--output-dir", dict(help="default: runs/<preset>-<optimizer>")),
    ("--cache-dir", dict(default=os.path.join(os.path.expanduser("~"), ".cache", "slimopt"))),
    ("--resume", dict(help="a checkpoint file, or 'auto' for OUTPUT/checkpoint-latest.pt")),
    ("--seed", dict(type=int, default=0)),
    ("--bf16", dict(choices=("auto", "on", "off"), default="auto")),
    ("--deepspeed", dict(help="DeepSpeed JSON config (through slimopt.launch.initialize; ZeRO "
                              "stage 0-3)")),
    ("--log-every", dict(type=int, default=10)),
    ("--no-progress", dict(action="store_true")),
    ("--no-tensorboard", dict(action="store_true")),
    ("--threads", dict(type=int, default=0, help="torch CPU threads (0: torch default)")),
    ("--grad-accum", dict(type=int, help="micro-batches per optimizer step: each rank's share "
                                         "of --batch-size in N parts, one backward each "
                                         "(default 1; with --deepspeed, its "
                                         "gradient_accumulation_steps)")),
    ("--activation-checkpointing", dict(action="store_true", help="recompute each decoder "
                                        "layer's activations in backward (non-reentrant): less "
                                        "activation memory for about one more forward")),
    ("--step-in-backward", dict(action="store_true", help="step each parameter during backward "
                                "and free its gradient (slimopt.step_in_backward; slimopt "
                                "optimizers; --grad-clip then clips each parameter's gradient "
                                "on its own)")),
    ("--state-dtype", dict(choices=STATE_DTYPES, help="a slimopt optimizer's moments in "
                                                      "float32 (default), bfloat16 or int8")),
    # testing aid: stop right after step N as if the run had been killed there
    ("--halt-after", dict(type=int, default=0, help=argparse.SUPPRESS)),
)

#: settings a preset supplies when the command line leaves them out
PRESET_DEFAULTS = ("lr", "rank", "update_interval", "steps", "batch_size", "seq_len", "warmup",
                   "eval_every", "vocab_size", "max_chars")
AT_LEAST_ONE = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                "rank", "update_interval", "vocab_size", "max_chars")
AT_LEAST_ZERO = ("warmup", "save_every")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="slimopt-pretrain", description=description)
    for flag, options in ARGUMENTS:
        parser.add_argument(flag, **options)
    return parser


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def check_names(args, error) -> None:
    """The preset and optimizer must be known and ``--opt-args`` a JSON object (parsed here)."""
    if args.preset not in PRESETS:
        error(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    args.optimizer = args.optimizer.lower()
    if args.optimizer not in KNOWN:
        error(f"unknown optimizer {args.optimizer!r}; known: {', '.join(sorted(KNOWN))}")
    try:
        args.opt_args = json.loads(args.opt_args)
        if not isinstance(args.opt_args, dict):
            raise ValueError
    except ValueError:
        error(f"--opt-args must be a JSON object, got {args.opt_args!r}")


def check_ranges(args, error) -> None:
    """Every number in its range (``error`` reports the first that is not)."""
    for key in AT_LEAST_ONE:
        if getattr(args, key) < 1:
            error(f"{_flag(key)} must be >= 1, got {getattr(args, key)}")
    for key in AT_LEAST_ZERO:
        if getattr(args, key) < 0:
            error(f"{_flag(key)} must be >= 0, got {getattr(args, key)}")
    if args.grad_clip is not None and not (args.grad_clip >= 0 and math.isfinite(args.grad_clip)):
        error(f"--grad-clip must be a finite number >= 0 (0 disables clipping), got "
              f"{args.grad_clip}")
    if not 0 <= args.min_lr_ratio <= 1:  # also refuses nan
        error(f"--min-lr-ratio must be in [0, 1] (the final lr as a fraction of --lr), got "
              f"{args.min_lr_ratio}")
    if args.threads < 0:
        error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.halt_after < 0:
        error(f"--halt-after must be >= 0, got {args.halt_after}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.vocab_size < 260:
        error(f"--vocab-size must be >= 260 (256 bytes + specials), got {args.vocab_size}")
    if args.grad_accum is not None and args.grad_accum < 1:
        error(f"--grad-accum must be >= 1, got {args.grad_accum}")


def check_memory_flags(args, error) -> None:
    """``--step-in-backward`` and ``--state-dtype`` need a slimopt optimizer (the first one
    without DeepSpeed; ZeRO-1/2/3 refuse low-precision states themselves, before the engine is
    built); ``--state-dtype`` defaults to ``--opt-args``' or float32 for a slimopt optimizer;
    ``--grad-accum`` to 1 (to the DeepSpeed config's with ``--deepspeed``)."""
    method = BY_NAME[args.optimizer]
    slimopt_names = ", ".join(sorted(n for n in KNOWN if not BY_NAME[n].is_peer))
    if args.step_in_backward:
        if args.deepspeed:
            error("--step-in-backward does not work with --deepspeed (the engine steps the "
                  "optimizer itself); drop one of them")
        if method.is_peer:
            error(f"--step-in-backward needs a slimopt optimizer ({slimopt_names}); "
                  f"{args.optimizer} is a peer: drop --step-in-backward")
    if args.state_dtype is not None:
        if method.is_peer:
            error(f"--state-dtype needs a slimopt optimizer ({slimopt_names}); "
                  f"{args.optimizer} is a peer: drop --state-dtype")
        given = args.opt_args.get("state_dtype", args.state_dtype)
        if given != args.state_dtype:
            error(f"--opt-args sets state_dtype {given!r} but --state-dtype is "
                  f"{args.state_dtype}")
    elif not method.is_peer:
        args.state_dtype = args.opt_args.get("state_dtype", "float32")
    if args.grad_accum is None and not args.deepspeed:
        args.grad_accum = 1


def validate(args, argv, error) -> None:
    """Check ``args`` (``error(message)`` exits), fill the preset's defaults, and add
    ``optimizer_given`` (whether ``argv`` names ``--optimizer``) and the default output folder."""
    check_names(args, error)
    defaults = PRESETS[args.preset][1]
    args.vocab_size_given = args.vocab_size is not None  # --tokenizer refuses a different one
    for key in PRESET_DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    check_ranges(args, error)
    check_memory_flags(args, error)
    args.optimizer_given = any(a == "--optimizer" or a.startswith("--optimizer=")
                               for a in (argv if argv is not None else sys.argv[1:]))
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.preset}-{args.optimizer}")
