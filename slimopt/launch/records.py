"""One record per optimizer method: slimopt's own and the peers it is compared with.

Everything that names a method is derived from ``METHODS``: the launcher's names and
``build_optimizer`` (``slimopt.launch.registry``), DeepSpeed's ``"slimopt.<Class>"`` lookup
(``slimopt.distributed.deepspeed.build_from_config``), the benchmarks' labels, libraries,
learning-rate centres and method lists, and the test tables (``tests/optimizer_registry.py``,
``tests/test_zero.py``), which refuse a method that has no record. Adding a method is its module,
its export and one ``Method(...)`` line here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from . import peers
from ..optimizers import (ROOT, SARA, SNSM, AdaPreLoRA, GaLore, GrassJump, GrassWalk,
                          SubsetNorm, SubspaceMomentum)

#: how a method's parameters are split (``slimopt.param_groups`` for slimopt's methods)
MATRICES = "matrices"            # projections take the rule; embeddings, head, norms AdamW
MATRICES_AND_HEAD = "matrices+head"  # the output head takes the rule too (SNSM's papers)
LORA_PAIRS = "lora-pairs"        # the optimizer finds the model's LoRA (A, B) pairs itself
PEER_SPLIT = "peer"              # the peer's builder splits (``slimopt.launch.peers``)

#: suites a method can run in
CLI = "cli"                      # ``slimopt-pretrain --optimizer NAME`` and ``build_optimizer``
DEEPSPEED = "deepspeed"          # ``{"optimizer": {"type": "slimopt.<Class>"}}``
GENERIC = "generic"              # tests/test_generic.py (tests/optimizer_registry.py entries)
REFERENCE = "reference"          # tests/test_reference.py (float64 Adam-in-subspace reference)
ZERO = "zero"                    # tests/test_zero.py, ZeRO-0..3 fp32 against one process
MEMORY = "memory"                # benchmarks/memory.py
STEPTIME = "steptime"            # benchmarks/steptime.py
CONVERGENCE = "convergence"      # benchmarks/convergence.py
_PRETRAINING = frozenset({CLI, MEMORY, STEPTIME, CONVERGENCE})
_SLIMOPT = _PRETRAINING | {DEEPSPEED, GENERIC, ZERO}


@dataclasses.dataclass(frozen=True)
class Method:
    """One method. ``build`` is a slimopt optimizer class, or for a peer a function
    ``build(model, lr=..., **options)`` (``slimopt.launch.peers``)."""
    name: str                    # the launcher's name (lower case)
    build: type | Callable
    library: str                 # the package it comes from ("slimopt" for ours)
    display: str                 # its label in the benchmark tables
    split: str                   # one of MATRICES, MATRICES_AND_HEAD, LORA_PAIRS, PEER_SPLIT
    suites: frozenset
    #: its matrix rule takes a rank (and an update interval)
    ranked: bool = False
    #: a rank fixed by the recipe (APOLLO-Mini: 1), whatever rank is asked for
    fixed_rank: int | None = None
    #: the launcher's weight decay when none is given; None keeps the builder's own default
    cli_weight_decay: float | None = 0.0
    #: centre of the convergence benchmark's learning-rate grid
    lr_centre: float = 3e-3

    @property
    def is_peer(self) -> bool:
        return self.library != "slimopt"

    @property
    def deepspeed_name(self) -> str | None:
        """``"slimopt.<Class>"`` in a DeepSpeed JSON config, None for a peer."""
        return None if self.is_peer else "slimopt." + self.build.__name__


def _ours(name, cls, display, split=MATRICES, suites=_SLIMOPT, **facts) -> Method:
    return Method(name, cls, "slimopt", display, split, frozenset(suites), **facts)


def _peer(name, build, library, display, suites=_PRETRAINING, **facts) -> Method:
    return Method(name, build, library, display, PEER_SPLIT, frozenset(suites), **facts)


_SUBSPACE = _SLIMOPT | {REFERENCE}

METHODS = (
    _ours("grasswalk", GrassWalk, "GrassWalk", suites=_SUBSPACE, ranked=True),
    _ours("grassjump", GrassJump, "GrassJump", suites=_SUBSPACE, ranked=True),
    _ours("sara", SARA, "SARA", suites=_SUBSPACE, ranked=True),
    _ours("galore-slimopt", GaLore, "GaLore (slimopt)", suites=_SUBSPACE, ranked=True),
    _ours("snsm", SNSM, "SNSM", MATRICES_AND_HEAD, ranked=True, lr_centre=3e-2),
    _ours("subspacemomentum", SubspaceMomentum, "SubspaceMomentum", MATRICES_AND_HEAD,
          ranked=True, lr_centre=3e-2),
    _ours("subsetnorm", SubsetNorm, "SubsetNorm (AdamSN)", MATRICES_AND_HEAD, lr_centre=3e-2),
    _ours("root", ROOT, "ROOT"),
    # fine-tuning only: not a pretraining method (tests/test_adaprelora.py, benchmarks/finetune)
    _ours("adaprelora", AdaPreLoRA, "AdaPreLoRA", LORA_PAIRS, suites={DEEPSPEED, GENERIC, ZERO}),
    _peer("adamw", peers.torch_adamw, "torch", "AdamW (torch)"),
    # the steptime reference; the same update as adamw, so no memory row or convergence run
    _peer("adamw-fused", peers.torch_adamw_fused, "torch", "AdamW fused (torch)",
          suites={CLI, STEPTIME}),
    _peer("muon", peers.torch_muon_with_adamw, "torch", "Muon + AdamW (torch)",
          cli_weight_decay=None),
    _peer("galore", peers.galore_torch, "galore-torch", "GaLoreAdamW (galore-torch)",
          ranked=True, cli_weight_decay=None),
    _peer("apollo", peers.apollo_torch, "apollo-torch", "APOLLO (apollo-torch)", ranked=True),
    _peer("apollo-mini", peers.apollo_mini, "apollo-torch", "APOLLO-Mini (apollo-torch)",
          ranked=True, fixed_rank=1),
    _peer("fira", peers.fira, "fira", "FiraAdamW (fira)", ranked=True),
    _peer("adafactor", peers.adafactor, "torch-optimizer", "Adafactor (torch-optimizer)"),
)
BY_NAME = {m.name: m for m in METHODS}


def in_suite(suite: str) -> list[Method]:
    """The methods ``suite`` runs, in ``METHODS`` order."""
    return [m for m in METHODS if suite in m.suites]


def from_deepspeed(kind: str) -> Method | None:
    """The method a DeepSpeed ``"slimopt.NAME"`` names: NAME is its class name or its launcher
    name, any case (``slimopt.GaLore`` is slimopt's GaLore, not the galore-torch peer)."""
    name = kind[len("slimopt."):].lower()
    return next((m for m in in_suite(DEEPSPEED)
                 if name in (m.name, m.build.__name__.lower())), None)


def cli_defaults(name: str) -> dict:
    """Options the launcher sets for ``name`` when the command line gives none: the weight decay
    (0.0, except for the peers that keep their package's own: Muon + AdamW and galore-torch)."""
    decay = BY_NAME[name.lower()].cli_weight_decay
    return {} if decay is None else {"weight_decay": decay}
