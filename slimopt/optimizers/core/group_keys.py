"""Which keys a parameter group may hold, and GaLore's names for slimopt's options.

A group key the optimizer does not know is refused when the group is added and when a state is
loaded (never at step time): a misspelt or foreign option (galore-torch's ``proj_type``,
torch's ``foreach``) would otherwise be silently ignored.
"""
from __future__ import annotations

#: keys torch and slimopt add to groups themselves: the named-parameters list, the ZeRO bridge's
#: bookkeeping, and what torch's learning-rate schedulers write at runtime (``initial_lr`` by
#: every ``LRScheduler``; OneCycleLR's ``max_lr``, ``min_lr``, ``max_momentum``,
#: ``base_momentum``; SWALR's ``swa_lr``)
SYSTEM_KEYS = frozenset({"params", "param_names", "zero_unit", "zero_index", "initial_lr",
                         "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"})
#: galore-torch's group keys and the slimopt option each is an alias of
ALIASES = {"update_proj_gap": "update_interval"}
#: galore-torch's ``proj_type`` values slimopt's low-rank methods follow
PROJ_TYPES = ("std",)
TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def resolve_aliases(group: dict, defaults: dict) -> dict:
    """``group`` with galore-torch's keys turned into slimopt's (a copy if any was present):
    ``update_proj_gap`` -> ``update_interval`` (both, with different values: refused);
    ``proj_type="std"`` is what slimopt does and is dropped, any other value is refused."""
    if not any(k in group for k in (*ALIASES, "proj_type")) or "update_interval" not in defaults:
        return group
    group = dict(group)
    for alias, name in ALIASES.items():
        if alias in group:
            value = group.pop(alias)
            if name in group and group[name] != value:
                raise ValueError(f"the group sets both {alias}={value!r} and {name}="
                                 f"{group[name]!r}; {alias} (galore-torch's name) is an alias of "
                                 f"{name}: give one")
            group[name] = value
    if "proj_type" in group:
        proj = group.pop("proj_type")
        if proj not in PROJ_TYPES:
            raise ValueError(
                f"proj_type={proj!r} is not supported: slimopt projects each matrix on its smaller "
                "side (galore-torch's proj_type='std', the only value accepted), square matrices "
                "on the left (galore-torch projects them on the right); reverse_std, left, right "
                "and full have no slimopt counterpart")
    return group


def check_known_keys(group: dict, defaults: dict, cls_name: str, where: str = "") -> None:
    """Refuse a key ``group`` holds that is neither an option of the optimizer nor a
    ``SYSTEM_KEYS`` entry, listing the known options."""
    unknown = sorted(str(k) for k in set(group) - set(defaults) - SYSTEM_KEYS)
    if not unknown:
        return
    flags = [k for k in unknown if k in TORCH_FLAGS]
    hint = (f" ({', '.join(flags)}: torch's implementation flags, which slimopt does not have; "
            "leave them out)") if flags else ""
    aliases = (" and galore-torch's update_proj_gap, proj_type='std'"
               if "update_interval" in defaults else "")
    raise ValueError(f"{cls_name}: {where}unknown parameter group option(s) {unknown}{hint}; its "
                     f"options are {sorted(defaults)}{aliases} (plus params/param_names)")
