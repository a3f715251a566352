"""Move a slimopt ZeRO checkpoint to another data-parallel world size (2 ranks -> 1 and back).

DeepSpeed writes one optimizer file per rank and refuses to load them at another world size.
Under slimopt's bridge (``slimopt.launch.zero``) the state of every matrix lives whole on its
owner rank, keyed by the parameter's index in the optimizer, so the ranks' states merge by union;
the fp32 weights come from DeepSpeed's own ``zero_to_fp32`` reader. This module does both:

    python -m slimopt.launch.zero_checkpoint CHECKPOINT_DIR OUT.pt [--tag TAG]

writes one world-size-free file (fp32 weights by name, every matrix's optimizer state, the param
group settings, the engine's step counters, LR-scheduler state and the client state), and

    client_state = slimopt.launch.load_resharded(engine, "OUT.pt")   # or CHECKPOINT_DIR, tag=

loads it (or a checkpoint directory directly) into an engine made by
``slimopt.launch.initialize`` at any world size and ZeRO stage 1-3, on every rank. Training then
continues as the uninterrupted run would, up to the float rounding of the new world size's
gradient sums. ZeRO-0 checkpoints need none of this: they are not partitioned, and
``engine.load_checkpoint`` reads them at any world size.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import torch

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


def _resolve_tag(checkpoint_dir: str, tag: str | None) -> str:
    if tag is not None:
        return tag
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file: pass tag=")
    with open(latest) as f:
        return f.read().strip()


def consolidate(checkpoint_dir: str, tag: str | None = None) -> dict:
    """One world-size-free dict from a DeepSpeed checkpoint written through
    ``slimopt.launch.initialize`` under ZeRO stage 1, 2 or 3."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag = _resolve_tag(checkpoint_dir, tag)
    folder = os.path.join(checkpoint_dir, tag)
    optim_files = sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")), key=_natural)
    model_files = sorted(glob.glob(os.path.join(folder, "*model_states.pt")), key=_natural)
    if not optim_files or not model_files:
        raise FileNotFoundError(f"{folder}: no ZeRO optimizer/model state files (is it a ZeRO "
                                "stage 1-3 checkpoint? ZeRO-0 loads at any world size as it is)")
    merged, groups, stage, world = {}, None, None, len(optim_files)
    for path in optim_files:
        zero_state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        # ZeRO-1/2 keep the client optimizer's state under "base_optimizer_state", ZeRO-3 under
        # "optimizer_state_dict"
        ours = zero_state.get("base_optimizer_state") or zero_state.get("optimizer_state_dict")
        ours = ours if isinstance(ours, dict) else {}
        if ours.get("slimopt_zero") != 1:
            raise ValueError(f"{path} was not written by a slimopt optimizer under "
                             "slimopt.launch.initialize")
        stage = int(zero_state.get("zero_stage", 0))
        for key, entry in ours["state"].items():
            if key in merged:
                raise ValueError(f"{path}: parameter {key}'s state is on two ranks")
            merged[key] = entry
        groups = ours["param_groups"]
    engine_state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    return {FORMAT: 1, "source": {"dir": os.path.abspath(checkpoint_dir), "tag": tag,
                                  "zero_stage": stage, "world_size": world},
            "weights": {name: t.detach().clone() for name, t in weights.items()},
            "optimizer": {"slimopt_zero": 1, "world_size": world, "state": merged,
                          "param_groups": groups},
            "engine": {k: engine_state.get(k) for k in ("global_steps", "global_samples",
                                                        "skipped_steps", "lr_scheduler")},
            "client_state": {k: v for k, v in engine_state.items() if k not in DEEPSPEED_KEYS}}


@torch.no_grad()
def load_resharded(engine, source, tag: str | None = None) -> dict:
    """Load ``source`` (a file written by this module's command, or a DeepSpeed checkpoint
    directory) into ``engine`` -- made by ``slimopt.launch.initialize`` with a slimopt optimizer
    under ZeRO stage 1-3, at any world size -- on every rank. Returns the client state."""
    data = (torch.load(source, map_location="cpu", weights_only=False)
            if os.path.isfile(source) else consolidate(source, tag))
    if data.get(FORMAT) != 1:
        raise ValueError(f"{source} is not a slimopt resharded checkpoint")
    zero = engine.optimizer
    optimizer = getattr(zero, "optimizer", None)
    bridge = getattr(optimizer, "_zero_bridge", None)
    if bridge is None:
        raise ValueError("load_resharded needs an engine made by slimopt.launch.initialize with a "
                         "slimopt optimizer under ZeRO stage 1, 2 or 3")
    weights = data["weights"]
    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(weights))
    if missing:
        raise ValueError(f"{source} lacks weights for {missing[:5]} (another model?)")
    key_to_name = {optimizer._param_keys[p]: n for n, p in named.items()
                   if p in optimizer._param_keys}
    # fp32 masters: every rank rebuilds its partition from the full weights
    for s, units in enumerate(bridge.groups):
        part = bridge.partition(s)
        table = torch.zeros(bridge.world, part.numel(), dtype=part.dtype, device=part.device)
        for unit in units:
            for key, offset, shape, piece in unit:
                value = weights[key_to_name[key]].to(part.device)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"{key_to_name[key]}: checkpoint shape {tuple(value.shape)}, "
                                     f"model {tuple(shape)}")
                bridge.write(table, offset, shape, piece, value)
        part.copy_(table[bridge.rank])
    # the low-precision weights DeepSpeed computes with, and the frozen ones
    for name, p in named.items():
        value = weights[name].to(p.device)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's piece
            piece = p.ds_tensor.numel()
            table = torch.zeros(bridge.world, piece, dtype=value.dtype, device=value.device)
            bridge.write(table, 0, value.shape, piece, value)
            p.ds_tensor.copy_(table[bridge.rank])
        else:
            p.copy_(value)
    optimizer.load_state_dict(data["optimizer"])
    counters = data["engine"]
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if counters.get(key) is not None:
            setattr(engine, key, counters[key])
    if counters.get("lr_scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    return data["client_state"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slimopt.launch.zero_checkpoint",
        description="Merge a slimopt ZeRO-1/2/3 checkpoint (one optimizer file per rank) into one "
                    "file that slimopt.launch.load_resharded loads at any world size.")
    parser.add_argument("checkpoint_dir", help="the folder passed to engine.save_checkpoint")
    parser.add_argument("out", help="output file (.pt)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        data = consolidate(args.checkpoint_dir, args.tag)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    torch.save(data, args.out)
    src = data["source"]
    print(f"{args.out}: {len(data['weights'])} weights, optimizer state of "
          f"{len(data['optimizer']['state'])} parameters, from ZeRO-{src['zero_stage']} at world "
          f"size {src['world_size']} (tag {src['tag']}, step {data['engine']['global_steps']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
