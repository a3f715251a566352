"""Load checkpoint files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary Python: a crafted checkpoint runs any
command it names while it loads. slimopt loads every file with ``weights_only=True``: tensors and
plain data, and besides those only the classes in ``ALLOWED``. The files slimopt writes need
nothing else. DeepSpeed's ZeRO optimizer files hold three DeepSpeed objects; ``ALLOWED`` lists
exactly those, found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` in the files
DeepSpeed 0.19.8 writes through ``slimopt.launch.initialize`` (ZeRO-0/1/2/3, fp32 and bf16, one
and two ranks, with an LR scheduler and a client state; the model-states files need none).

DeepSpeed's own ``engine.load_checkpoint`` and ``zero_to_fp32`` unpickle with
``weights_only=False``: call ``check_deepspeed_tag`` first, which loads every file of the tag
this way, so that a planted pickle is refused before DeepSpeed reads it.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import zipfile

import torch

#: "module.Name" -> why a DeepSpeed checkpoint needs it (and nothing more)
ALLOWED = {
    "deepspeed.runtime.zero.config.ZeroStageEnum":
        "the ZeRO stage (an int enum), 'zero_stage' in every ZeRO-1/2/3 optimizer file",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler":
        "the static loss scaler (cur_scale 1.0, dynamic False), 'loss_scaler' in every ZeRO-1/2/3 "
        "optimizer file; slimopt refuses fp16, so DynamicLossScaler never occurs",
    "deepspeed.utils.tensor_fragment.fragment_address":
        "(numel, start) of each parameter's slice of the flat partition, 'param_slice_mappings' "
        "in ZeRO-1/2 optimizer files",
}


def _allowed_objects() -> list:
    """The classes of ``ALLOWED`` (they need DeepSpeed installed; without it none is allowed,
    and a file that names one is refused by ``load_file`` with that reason)."""
    found = []
    for name in ALLOWED:
        module, attr = name.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


def _first_line(err: BaseException) -> str:
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch's own reason, after its general advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _globals_named(path, err: BaseException) -> list:
    """The Python globals the file's pickle names beyond tensors and plain data (read without
    unpickling; torch's error text if its reader cannot)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 -- only the message depends on it
        return sorted(set(re.findall(r"GLOBAL (\w+(?:\.\w+)+)", str(err))))


def _refusal(path, err: BaseException) -> ValueError:
    """One line naming ``path`` and, for a global outside ``ALLOWED``, that global."""
    names = _globals_named(path, err)
    refused = [name for name in names if name not in ALLOWED]
    if refused:
        return ValueError(f"{path}: refused: it names the Python global {refused[0]}, which is "
                          "not on slimopt's allow-list (tensors, plain data and "
                          f"{', '.join(sorted(ALLOWED))}); unpickling it could run code")
    if names and len(_allowed_objects()) < len(ALLOWED):
        return ValueError(f"{path}: it holds {names[0]}, which needs DeepSpeed installed to load")
    return ValueError(f"{path}: not a loadable checkpoint file ({type(err).__name__}: "
                      f"{_first_line(err)})")


def load_file(path, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` onto the CPU with ``ALLOWED`` as the only
    classes besides tensors and plain data. Any failure (missing, truncated or random bytes, a
    refused global) is a ``ValueError`` naming the file. ``mmap`` maps the tensors instead of
    reading them (for a check that only needs the file to unpickle)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a complete torch checkpoint (no zip directory: truncated, "
                         "damaged, or not written by torch.save)")
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 -- every failure becomes one line naming the file
        raise _refusal(path, err) from None


def resolve_tag(folder, tag=None) -> str:
    """``tag``, or the one ``folder``'s ``latest`` file names; a tag is one folder name."""
    if tag is None:
        latest = os.path.join(folder, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"{folder} has no 'latest' file: pass the tag (a subfolder name, "
                             "such as step8)")
        with open(latest) as f:
            tag = f.read().strip()
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag:
        raise ValueError(f"checkpoint tag {tag!r}: a tag is the name of one subfolder of "
                         f"{folder}")
    return tag


def _zero_stage(model_states: dict) -> int:
    config = model_states.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage) if str(stage).isdigit() else 0


def _check_ranks(path, model_states, optim_files, model_files) -> None:
    """One optimizer file (ZeRO-1/2/3) and, under ZeRO-3, one model-states file per rank that
    wrote the checkpoint."""
    world = model_states.get("dp_world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"{model_files[0]}: not a DeepSpeed model-states file (no dp_world_size)")
    stage = _zero_stage(model_states)
    if not optim_files and stage == 0:
        return  # ZeRO-0: the optimizer state is in the model-states file
    names = [os.path.basename(f) for f in optim_files]
    missing = [r for r in range(world)
               if not any(re.search(rf"(^|_)zero_pp_rank_{r}_mp_rank_", n) for n in names)]
    if missing or len(optim_files) != world:
        raise ValueError(f"{path}: {len(optim_files)} optimizer state files (*_optim_states.pt) "
                         f"for the {world} ranks that wrote it (none for ranks {missing}): the "
                         "tag is incomplete or mixed")
    if stage == 3 and len(model_files) != world:
        raise ValueError(f"{path}: {len(model_files)} model-states files for the {world} ranks "
                         "that wrote it under ZeRO-3: the tag is incomplete")


def check_deepspeed_tag(folder, tag=None) -> str:
    """Check the DeepSpeed checkpoint ``folder``/``tag`` (``tag`` None: the one named in
    ``folder``/latest) before DeepSpeed, which unpickles with ``weights_only=False``, reads it:
    the tag exists, holds its model states and one optimizer file per rank that wrote it, and
    every ``*.pt`` in it loads through ``load_file``. Raises ``ValueError`` (one line);
    returns the tag's path."""
    tag = resolve_tag(folder, tag)
    path = os.path.join(folder, tag)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint tag")
    files = sorted(glob.glob(os.path.join(path, "*.pt")))
    model_files = [f for f in files if f.endswith("model_states.pt")]
    optim_files = [f for f in files if f.endswith("_optim_states.pt")]
    if not model_files:
        raise ValueError(f"{path}: no model states (mp_rank_00_model_states.pt, or "
                         "zero_pp_rank_*_mp_rank_00_model_states.pt under ZeRO-3): the tag is "
                         "incomplete")
    model_states = load_file(model_files[0], mmap=True)
    if not isinstance(model_states, dict):
        raise ValueError(f"{model_files[0]}: not a DeepSpeed model-states file (a "
                         f"{type(model_states).__name__}, not a dict)")
    _check_ranks(path, model_states, optim_files, model_files)
    for file in files:
        if file != model_files[0]:
            load_file(file, mmap=True)
    return path
