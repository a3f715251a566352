"""The ``--deepspeed`` JSON of ``slimopt-pretrain``, read and checked against the command line
(global batch, clipping, bf16 and the optimizer section must agree with it)."""
from __future__ import annotations

import json

from .train_config import DEFAULT_GRAD_CLIP, UsageError


def load_deepspeed_config(args, world):
    """The DeepSpeed JSON, checked against the CLI: the global batch, clipping and bf16 must
    agree (a missing value is filled in from the CLI); a non-slimopt optimizer section is
    refused, and a slimopt one must match an explicit --optimizer."""
    try:
        with open(args.deepspeed) as f:
            cfg = json.load(f)
    except OSError as err:
        raise UsageError(f"--deepspeed {args.deepspeed}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"--deepspeed {args.deepspeed}: not valid JSON ({err})") from None
    check_deepspeed_shape(cfg, args.deepspeed)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    if accum is not None and args.grad_accum not in (None, accum):
        raise UsageError(f"--deepspeed {args.deepspeed} sets gradient_accumulation_steps "
                         f"{accum} but --grad-accum is {args.grad_accum}")
    accum = accum or args.grad_accum or 1
    cfg["gradient_accumulation_steps"] = args.grad_accum = accum
    if micro is None:
        micro = args.batch_size // (world * accum)
        cfg["train_micro_batch_size_per_gpu"] = micro
    total = cfg.get("train_batch_size", micro * accum * world)
    if micro * accum * world != args.batch_size or total != args.batch_size:
        raise UsageError(f"--deepspeed {args.deepspeed} contradicts --batch-size "
                         f"{args.batch_size}: micro batch {micro} x accumulation {accum} x "
                         f"{world} ranks = {micro * accum * world}")
    cfg.pop("train_batch_size", None)
    clip = cfg.get("gradient_clipping")
    if clip is not None and args.grad_clip is not None and clip != args.grad_clip:
        raise UsageError(f"--deepspeed {args.deepspeed} sets gradient_clipping {clip} but "
                         f"--grad-clip is {args.grad_clip}")
    cfg["gradient_clipping"] = clip if clip is not None else (
        args.grad_clip if args.grad_clip is not None else DEFAULT_GRAD_CLIP)
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if (args.bf16 == "on" and not bf16) or (args.bf16 == "off" and bf16):
        raise UsageError(f"--deepspeed {args.deepspeed} has bf16 {'on' if bf16 else 'off'} "
                         f"but --bf16 is {args.bf16}")
    section = cfg.get("optimizer")
    if section is not None:
        kind = str(section.get("type", ""))
        if not kind.lower().startswith("slimopt."):
            raise UsageError(f"--deepspeed {args.deepspeed} names optimizer {kind!r}: name a "
                             "slimopt.* optimizer there, or drop the section and use --optimizer")
        name = kind[len("slimopt."):].lower()
        if args.optimizer_given and name != args.optimizer:
            raise UsageError(f"--deepspeed {args.deepspeed} names {kind} but --optimizer is "
                             f"{args.optimizer}")
        args.optimizer = name
    cfg.setdefault("steps_per_print", 10 ** 9)
    return cfg


def check_deepspeed_shape(cfg, path) -> None:
    """The parts of a DeepSpeed JSON this CLI reads must have the types DeepSpeed documents."""
    if not isinstance(cfg, dict):
        raise UsageError(f"--deepspeed {path}: the top level must be a JSON object, got "
                         f"{type(cfg).__name__}")
    for key in ("bf16", "fp16", "optimizer", "zero_optimization"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise UsageError(f"--deepspeed {path}: {key!r} must be a JSON object, got "
                             f"{type(cfg[key]).__name__}")
    params = cfg.get("optimizer", {}).get("params", {})
    if not isinstance(params, dict):
        raise UsageError(f"--deepspeed {path}: optimizer.params must be a JSON object, got "
                         f"{type(params).__name__}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UsageError(f"--deepspeed {path}: {key} must be an integer >= 1, got {value!r}")
