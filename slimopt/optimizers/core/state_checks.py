"""Checks of a saved optimizer state before ``load_state_dict`` lets it replace anything.

Each function raises one ``ValueError`` naming what does not fit; none changes its inputs. The
optimizer supplies what a state must look like (``SlimOptimizer.expected_state``: the fresh state
of each parameter, with meta tensors for the shapes) and its hyperparameter checks.
"""
from __future__ import annotations

import numbers

import torch

#: top-level key of ``SlimOptimizer.state_dict()`` naming the class that saved it
CLASS_KEY = "slimopt_class"


def check_format(state_dict, cls_name: str) -> None:
    """A plain ``torch.optim`` state dict, saved by ``cls_name`` if it says who saved it."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"{cls_name}.load_state_dict expects a dict, got "
                         f"{type(state_dict).__name__}")
    if "slimopt_zero" in state_dict:
        raise ValueError("this is a ZeRO-bridge optimizer state (saved by an engine from "
                         "slimopt.launch.initialize under ZeRO stage 1-3): load it through that "
                         "engine (engine.load_checkpoint), or at another world size with "
                         "slimopt.launch.zero_checkpoint.load_resharded")
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing or not isinstance(state_dict["state"], dict) \
            or not isinstance(state_dict["param_groups"], list):
        raise ValueError(f"not an optimizer state dict: it needs a dict 'state' and a list "
                         f"'param_groups' (missing: {missing})")
    saved = state_dict.get(CLASS_KEY)
    if saved is not None and saved != cls_name:
        raise ValueError(f"this optimizer state was saved by {saved}; this optimizer is "
                         f"{cls_name}. Another method's state would silently change the algorithm "
                         f"(its options and state differ): resume it with {saved}")


def check_group_layout(saved_groups: list, groups: list) -> None:
    """As many groups as the optimizer, each listing as many parameters."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state has {len(saved_groups)} parameter group(s), the optimizer "
                         f"{len(groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"group {i} of the state is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"group {i}: the state lists {len(saved['params'])} parameter(s), the "
                             f"optimizer {len(group['params'])}")


def check_group_options(saved: dict, required, index: int) -> None:
    """Every option the optimizer reads is in the saved group (another optimizer's lacks some)."""
    missing = sorted(set(required) - set(saved))
    if missing:
        raise ValueError(f"group {index} of the state lacks the options {missing}: it was saved by "
                         "another optimizer (torch.optim.AdamW?)")


def check_param_indices(state: dict, saved_groups: list) -> None:
    """Every state entry belongs to a parameter some saved group lists."""
    listed = {i for g in saved_groups for i in g["params"]}
    stray = sorted((k for k in state if k not in listed), key=repr)
    if stray:
        raise ValueError(f"the state holds entries for parameter indices {stray[:5]} that no "
                         "parameter group lists")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_param_state(entry, expected: dict, optional, where: str) -> None:
    """``entry`` has every key of ``expected`` (tensors of the same shape, counts >= 0), and
    nothing else but the ``optional`` keys a rule adds later."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: its state must be a dict, got {type(entry).__name__}")
    missing = [k for k in expected if k not in entry and k not in optional]
    if missing:
        raise ValueError(f"{where}: its state lacks {missing} (saved by another optimizer, or "
                         "for another parameter?)")
    unknown = sorted(str(k) for k in set(entry) - set(expected) - set(optional))
    if unknown:
        raise ValueError(f"{where}: its state holds {unknown}, which this optimizer does not keep "
                         "(saved by another optimizer, or with other options?)")
    for key, want in expected.items():
        if key not in entry:
            continue
        got = entry[key]
        if torch.is_tensor(want) and want.dim() == 0 and _real(got):
            continue  # a 0-d tensor is saved as a number (SlimOptimizer.state_dict)
        if torch.is_tensor(want):
            if not torch.is_tensor(got) or tuple(got.shape) != tuple(want.shape):
                shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
                raise ValueError(f"{where}: its state's {key!r} has shape {shape}, this "
                                 f"parameter needs {tuple(want.shape)}")
        elif not _count(got):
            raise ValueError(f"{where}: its state's {key!r} must be an int >= 0, got {got!r}")


def check_stored_dtypes(entry: dict, expected: dict, where: str) -> None:
    """The tensors ``expected`` holds in a dtype that is not floating (int8 codes) or is
    bfloat16 (low-precision moments) are saved in that dtype: another one would be a state
    saved with another ``state_dtype`` or built by hand."""
    for key, want in expected.items():
        got = entry.get(key)
        if torch.is_tensor(want) and torch.is_tensor(got) and got.dtype != want.dtype and (
                want.dtype == torch.bfloat16 or not want.is_floating_point()):
            raise ValueError(f"{where}: its state's {key!r} is {got.dtype}, this optimizer "
                             f"stores it as {want.dtype}")
