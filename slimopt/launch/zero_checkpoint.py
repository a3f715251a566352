"""Move a slimopt ZeRO checkpoint to another data-parallel world size (2 ranks -> 1 and back).

DeepSpeed writes one optimizer file per rank and refuses to load them at another world size.
Under slimopt's bridge (``slimopt.launch.zero``) the state of every matrix lives whole on its
owner rank, keyed by the parameter's index in the optimizer, so those merge by union; every rank
keeps the slice it holds of each element-wise parameter's state (with its first element), and
the slices are concatenated back into whole states (``join_slices``), which each rank of the new
world size cuts again on load. The fp32 weights come from DeepSpeed's own ``zero_to_fp32``
reader. This module does both:

    python -m slimopt.launch.zero_checkpoint CHECKPOINT_DIR OUT.pt [--tag TAG]

writes one world-size-free file (fp32 weights by name, every matrix's optimizer state, the param
group settings, the engine's step counters, LR-scheduler state and the client state), atomically
(temp file, fsync, rename), and

    client_state = slimopt.launch.load_resharded(engine, "OUT.pt")   # or CHECKPOINT_DIR, tag=

loads it (or a checkpoint directory directly) into an engine made by
``slimopt.launch.initialize`` at any world size and ZeRO stage 1-3, on every rank. Training then
continues as the uninterrupted run would, up to the float rounding of the new world size's
gradient sums. ZeRO-0 checkpoints need none of this: they are not partitioned, and
``engine.load_checkpoint`` reads them at any world size.

No code runs from a checkpoint: every file is loaded with ``weights_only=True``
(``slimopt.launch.safe_load``), and a DeepSpeed tag is checked whole before DeepSpeed's own
``zero_to_fp32`` reader (``weights_only=False``) sees it. A damaged, incomplete or crafted
checkpoint is a ``ValueError`` (the command: one line ``error: ...``, exit code 2).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import torch

from .cli_errors import first_line
from .checkpoint_io import write_atomic
from .safe_load import check_deepspeed_tag, load_file

#: top-level keys of DeepSpeed's model-states file that are DeepSpeed's own (the rest is the
#: client state passed to ``save_checkpoint``)
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                  "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
                  "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
                  "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
                  "checkpoint_parallel_dims", "checkpoint_parallel_dimensions",
                  "ds_zero_partition_groups"}
FORMAT = "slimopt_resharded"


def _natural(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _slimopt_share(path) -> tuple[int, dict]:
    """``(ZeRO stage, the slimopt bridge's state)`` of one rank's optimizer file."""
    saved = load_file(path)
    zero_state = saved.get("optimizer_state_dict") if isinstance(saved, dict) else None
    if not isinstance(zero_state, dict):
        raise ValueError(f"{path} is not a DeepSpeed ZeRO optimizer file (no "
                         "optimizer_state_dict)")
    # ZeRO-1/2 keep the client optimizer's state under "base_optimizer_state", ZeRO-3 under
    # "optimizer_state_dict"
    ours = zero_state.get("base_optimizer_state") or zero_state.get("optimizer_state_dict")
    if not isinstance(ours, dict) or ours.get("slimopt_zero") != 1 \
            or not isinstance(ours.get("state"), dict):
        raise ValueError(f"{path} was not written by a slimopt optimizer under "
                         "slimopt.launch.initialize")
    return int(zero_state.get("zero_stage", 0)), ours


def _fp32_weights(checkpoint_dir, tag) -> dict:
    """The full fp32 weights by name, by DeepSpeed's ``zero_to_fp32`` (call it on a checked
    tag only: it unpickles with ``weights_only=False``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    except Exception as err:  # noqa: BLE001 -- DeepSpeed's reader: one line naming the tag
        first = first_line(err, "no message")
        raise ValueError(f"{os.path.join(checkpoint_dir, tag)}: DeepSpeed's zero_to_fp32 could "
                         f"not read the weights ({type(err).__name__}: {first})") from None
    return {name: t.detach().clone() for name, t in weights.items()}


def consolidate(checkpoint_dir: str, tag: str | None = None) -> dict:
    """One world-size-free dict from a DeepSpeed checkpoint written through
    ``slimopt.launch.initialize`` under ZeRO stage 1, 2 or 3. Every file is checked
    (``safe_load.check_deepspeed_tag``) before anything reads it; a problem is a
    ``ValueError``."""
    folder = check_deepspeed_tag(checkpoint_dir, tag)
    tag = os.path.basename(folder)
    optim_files = sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")), key=_natural)
    model_files = sorted(glob.glob(os.path.join(folder, "*model_states.pt")), key=_natural)
    if not optim_files:
        raise ValueError(f"{folder}: no ZeRO optimizer state files (is it a ZeRO stage 1-3 "
                         "checkpoint? ZeRO-0 loads at any world size as it is)")
    merged, slices, groups, stage, world = {}, {}, None, None, len(optim_files)
    for path in optim_files:
        stage, ours = _slimopt_share(path)
        for key, entry in ours["state"].items():
            if key in merged:
                raise ValueError(f"{path}: parameter {key}'s state is on two ranks")
            merged[key] = entry
        for key, record in (ours.get("slices") or {}).items():
            slices.setdefault(key, []).append((path, record))
        groups = ours["param_groups"]
    for key, pieces in slices.items():
        if key in merged:
            raise ValueError(f"{pieces[0][0]}: parameter {key} has a whole state and slices")
        merged[key] = join_slices(key, pieces)
    engine_state = load_file(model_files[0])
    return {FORMAT: 1, "source": {"dir": os.path.abspath(checkpoint_dir), "tag": tag,
                                  "zero_stage": stage, "world_size": world},
            "weights": _fp32_weights(checkpoint_dir, tag),
            "optimizer": {"slimopt_zero": 1, "world_size": world, "state": merged,
                          "param_groups": groups},
            "engine": {k: engine_state.get(k) for k in ("global_steps", "global_samples",
                                                        "skipped_steps", "lr_scheduler")},
            "client_state": {k: v for k, v in engine_state.items() if k not in DEEPSPEED_KEYS}}


def join_slices(key, pieces) -> dict:
    """The whole state of element-wise parameter ``key`` from its ranks' slices (``pieces``:
    ``(file, {"start", "shape", "state"})``, as ``ZeroBridge.state_dict`` writes them): the
    slices' tensors concatenated in element order, which must cover the parameter exactly once,
    and their other entries (step counts), which must agree."""
    def start(piece):
        first = piece[1].get("start") if isinstance(piece[1], dict) else None
        return first if isinstance(first, int) else -1

    ordered = sorted(pieces, key=start)
    shape, end, parts, scalars = None, 0, {}, None
    for path, record in ordered:
        state = record.get("state") if isinstance(record, dict) else None
        if not isinstance(state, dict) or record.get("start") != end:
            raise ValueError(f"{path}: the slices of parameter {key} do not follow each other "
                             f"(one should start at element {end})")
        shape = tuple(record.get("shape", ()))
        sizes = {v.numel() for v in state.values() if torch.is_tensor(v)}
        if len(sizes) != 1:
            raise ValueError(f"{path}: the slice of parameter {key} holds tensors of sizes "
                             f"{sorted(sizes)}, not one slice size")
        end += sizes.pop()
        others = {k: v for k, v in state.items() if not torch.is_tensor(v)}
        if scalars is not None and others != scalars:
            raise ValueError(f"{path}: the slices of parameter {key} disagree on {others} vs "
                             f"{scalars} (ranks at different steps?)")
        scalars = others
        for k, v in state.items():
            if torch.is_tensor(v):
                parts.setdefault(k, []).append(v.reshape(-1))
    numel = 1
    for size in shape or ():
        numel *= size
    if end != numel:
        raise ValueError(f"{ordered[-1][0]}: the slices of parameter {key} cover {end} of its "
                         f"{numel} elements (a rank's file missing?)")
    return dict(scalars, **{k: torch.cat(v).view(shape) for k, v in parts.items()})


@torch.no_grad()
def load_resharded(engine, source, tag: str | None = None) -> dict:
    """Load ``source`` (a file written by this module's command, or a DeepSpeed checkpoint
    directory) into ``engine`` -- made by ``slimopt.launch.initialize`` with a slimopt optimizer
    under ZeRO stage 1-3, at any world size -- on every rank. Returns the client state.
    Everything is checked before anything changes; a problem is a ``ValueError``."""
    data = load_file(source) if os.path.isfile(source) else consolidate(source, tag)
    if not isinstance(data, dict) or data.get(FORMAT) != 1:
        raise ValueError(f"{source} is not a slimopt resharded checkpoint (written by python -m "
                         "slimopt.launch.zero_checkpoint)")
    optimizer = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    bridge = getattr(optimizer, "step_router", None)
    if bridge is None:
        raise ValueError("load_resharded needs an engine made by slimopt.launch.initialize with a "
                         "slimopt optimizer under ZeRO stage 1, 2 or 3")
    named = dict(engine.module.named_parameters())
    _check_weights(data.get("weights"), named, source)
    bridge.check_state_dict(optimizer, data.get("optimizer"), merged=True)
    _write_weights(data["weights"], named, optimizer, bridge)
    bridge.load_state_dict(optimizer, data["optimizer"], merged=True)
    counters = data.get("engine") or {}
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if counters.get(key) is not None:
            setattr(engine, key, counters[key])
    if counters.get("lr_scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    return data.get("client_state") or {}


def _check_weights(weights, named, source) -> None:
    """A full-size tensor of each parameter's shape for every parameter of the model."""
    if not isinstance(weights, dict):
        raise ValueError(f"{source} holds no weights")
    missing = sorted(set(named) - set(weights))
    if missing:
        raise ValueError(f"{source} lacks weights for {missing[:5]} (another model?)")
    for name, p in named.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the real shape
        value = weights[name]
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{source}: {name} has shape {got} in the checkpoint, {shape} in "
                             "the model")


def _write_weights(weights, named, optimizer, bridge) -> None:
    """Every rank rebuilds its fp32 master partitions and its low-precision (and frozen)
    weights from the full ``weights``."""
    key_to_name = {optimizer.param_key(p): n for n, p in named.items()
                   if optimizer.param_key(p) is not None}
    for s, slots in enumerate(bridge.slots):
        part = bridge.partition(s)
        table = torch.zeros(bridge.world, part.numel(), dtype=part.dtype, device=part.device)
        for slot in slots:
            bridge.write(table, slot.offset, slot.shape, slot.chunk,
                         weights[key_to_name[slot.key]].to(part.device))
        part.copy_(table[bridge.rank])
    for name, p in named.items():
        value = weights[name].to(p.device)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's chunk
            chunk = p.ds_tensor.numel()
            table = torch.zeros(bridge.world, chunk, dtype=value.dtype, device=value.device)
            bridge.write(table, 0, value.shape, chunk, value)
            p.ds_tensor.copy_(table[bridge.rank])
        else:
            p.copy_(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slimopt.launch.zero_checkpoint",
        description="Merge a slimopt ZeRO-1/2/3 checkpoint (one optimizer file per rank) into one "
                    "file that slimopt.launch.load_resharded loads at any world size.")
    parser.add_argument("checkpoint_dir", help="the folder passed to engine.save_checkpoint")
    parser.add_argument("out", help="output file (.pt), written atomically")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.exit(2, f"error: cannot write {args.out}: the folder {out_dir} does not exist\n")
    try:
        data = consolidate(args.checkpoint_dir, args.tag)
        write_atomic(data, args.out)
    except (ValueError, OSError) as err:
        first = first_line(err, limit=None)
        parser.exit(2, f"error: {first}\n")
    src = data["source"]
    print(f"{args.out}: {len(data['weights'])} weights, optimizer state of "
          f"{len(data['optimizer']['state'])} parameters, from ZeRO-{src['zero_stage']} at world "
          f"size {src['world_size']} (tag {src['tag']}, step {data['engine']['global_steps']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
