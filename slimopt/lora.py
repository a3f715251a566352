"""LoRA factor pairs: finding them in a model (peft's or slimopt's own), a minimal LoRA wrapper for
``nn.Linear`` when peft is not installed, and ReLoRA-style merge-and-restart for pretraining.

A pair is ``(A, B, s)`` with ``W = W0 + s B A``: ``A`` (r x n) is ``lora_A``'s weight, ``B``
(m x r) is ``lora_B``'s, ``s`` the scaling (``alpha / r``). Pairs are found by walking the modules
(never by parameter order): a module with ``lora_A`` and ``lora_B`` children is a LoRA layer;
peft keeps one ``nn.Linear`` per adapter name in ``ModuleDict``s and ``scaling`` in a dict.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn


@dataclasses.dataclass
class LoraPair:
    name: str
    module: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    adapter: str | None = None


class LoRALinear(nn.Module):
    """``y = base(x) + s * B(A(x))`` with ``A: nn.Linear(in, r)`` (Kaiming-uniform, as peft) and
    ``B: nn.Linear(r, out)`` (zeros), ``s = alpha / r``; the base layer is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.reset_factors()

    def reset_factors(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")) -> nn.Module:
    """Replace every ``nn.Linear`` whose name ends in one of ``targets`` by a ``LoRALinear``
    (in place) and freeze everything else; returns ``model``."""
    found = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                found += 1
    if not found:
        raise ValueError(f"apply_lora: no nn.Linear named {list(targets)} in the model")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


def _check_pair(name, A, B):
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA pair {name}: factors must be matrices, got A {tuple(A.shape)} "
                         f"and B {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA pair {name}: rank mismatch, A is {tuple(A.shape)} (r x n) but B "
                         f"is {tuple(B.shape)} (m x r)")


def find_lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every trainable ``(A, B, s)`` pair in ``model`` (peft's LoRA layers or ``LoRALinear``).

    DoRA layers are skipped with a warning (their magnitude vector changes the math), so their
    factors fall to AdamW; a ``lora_A`` without its ``lora_B`` is an error."""
    pairs = []
    for name, module in model.named_modules():
        has_a, has_b = hasattr(module, "lora_A"), hasattr(module, "lora_B")
        if not (has_a or has_b):
            continue
        if has_a != has_b:
            raise ValueError(f"module {name!r} has lora_{'A' if has_a else 'B'} but no "
                             f"lora_{'B' if has_a else 'A'}: an unpaired LoRA factor")
        lora_a, lora_b = module.lora_A, module.lora_B
        if isinstance(lora_a, nn.ModuleDict):  # peft: one Linear per adapter name
            scaling = getattr(module, "scaling", {})
            use_dora = getattr(module, "use_dora", {})
            for adapter in lora_a.keys():
                if adapter not in lora_b:
                    raise ValueError(f"module {name!r}: adapter {adapter!r} has lora_A but no "
                                     "lora_B")
                A, B = lora_a[adapter].weight, lora_b[adapter].weight
                if not (A.requires_grad and B.requires_grad):
                    continue
                if use_dora.get(adapter, False):
                    warnings.warn(f"{name}: DoRA adapter {adapter!r} is not a plain LoRA pair; "
                                  "its parameters get AdamW")
                    continue
                _check_pair(f"{name}[{adapter}]", A, B)
                pairs.append(LoraPair(name, module, A, B, float(scaling.get(adapter, 1.0)),
                                      adapter))
        elif isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear):
            A, B = lora_a.weight, lora_b.weight
            if A.requires_grad and B.requires_grad:
                _check_pair(name, A, B)
                pairs.append(LoraPair(name, module, A, B, float(getattr(module, "scaling", 1.0))))
    return pairs


def lora_param_groups(model: nn.Module) -> list[dict]:
    """One group per LoRA pair (``{"params": [A, B], "lora_scale": s}``) and one dense group
    (``dense=True``: AdamW) with every other trainable parameter; each group carries torch's
    ``param_names``, so every parameter's key (its state's name and its random draws) comes from
    its name."""
    pairs = find_lora_pairs(model)
    if not pairs:
        raise ValueError("no LoRA pair (modules with lora_A and lora_B) in the model; wrap it with "
                         "peft.get_peft_model or slimopt.lora.apply_lora first")
    names = {id(p): n for n, p in model.named_parameters()}
    in_pairs = {id(t) for pair in pairs for t in (pair.A, pair.B)}
    groups = [{"params": [pair.A, pair.B], "param_names": [names[id(pair.A)], names[id(pair.B)]],
               "lora_scale": pair.scale} for pair in pairs]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    if rest:
        groups.append({"params": rest, "param_names": [names[id(p)] for p in rest],
                       "dense": True})
    return groups


@torch.no_grad()
def merge_and_reset_(model: nn.Module, optimizer=None) -> int:
    """ReLoRA's restart: ``W0 <- W0 + s B A`` for every pair, then ``A`` re-drawn (Kaiming
    uniform) and ``B`` zeroed, so the model function is unchanged and the next rank-r change can
    accumulate on top; ``optimizer.reset_pair(A, B)`` (if given) drops the factor momentum and
    keeps the W-space statistics. Returns the number of pairs merged."""
    pairs = find_lora_pairs(model)
    for pair in pairs:
        delta = pair.scale * (pair.B @ pair.A)
        base = pair.module.base if isinstance(pair.module, LoRALinear) else \
            pair.module.get_base_layer()
        fan_in_fan_out = getattr(pair.module, "fan_in_fan_out", False)
        base.weight.add_((delta.T if fan_in_fan_out else delta).to(base.weight.dtype))
        nn.init.kaiming_uniform_(pair.A, a=math.sqrt(5))
        nn.init.zeros_(pair.B)
        if optimizer is not None and hasattr(optimizer, "reset_pair"):
            optimizer.reset_pair(pair.A, pair.B)
    return len(pairs)


class ReLoRA:
    """Calls ``merge_and_reset_`` every ``every`` optimizer steps: ``relora.step()`` after
    ``optimizer.step()``. Pair it with a learning-rate schedule that warms up again after each
    merge (ReLoRA's jagged schedule), e.g. ``ReLoRA.jagged_lambda``."""

    def __init__(self, model: nn.Module, optimizer, every: int, warmup: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.model, self.optimizer, self.every, self.warmup = model, optimizer, every, warmup
        self.steps = 0
        self.merges = 0

    def step(self) -> bool:
        self.steps += 1
        if self.steps % self.every:
            return False
        merge_and_reset_(self.model, self.optimizer)
        self.merges += 1
        return True

    def jagged_lambda(self, step: int) -> float:
        """A multiplier that ramps linearly from 0 over ``warmup`` steps after each merge."""
        if self.warmup <= 0 or step < self.every:
            return 1.0
        return min(1.0, (step % self.every + 1) / self.warmup)
