"""slimopt's optimizers by name, built for a model with their own parameter split.

``create_optimizer(model, "grasswalk", lr=1e-3, rank=128)`` is pytorch-optimizer's
``create_optimizer(model, name, ...)`` for slimopt's methods; ``list_optimizers()`` names them;
``HFOptimizerFactory`` plugs one into Hugging Face's ``Trainer(optimizer_cls_and_kwargs=...)``.
The names and each method's split come from the method records (``slimopt.launch.records``);
the peers there (torch AdamW, galore-torch, ...) are not built here (``slimopt.launch.
build_optimizer`` builds those).
"""
from __future__ import annotations

import torch

from .launch import records
from .param_groups import param_groups

__all__ = ["create_optimizer", "list_optimizers", "HFOptimizerFactory"]


def _ours() -> list[records.Method]:
    return [m for m in records.METHODS if not m.is_peer]


def list_optimizers() -> list[str]:
    """The launcher names of slimopt's optimizers (``"grasswalk"``, ``"snsm"``, ...), in the
    records' order. ``create_optimizer`` also takes their class names, in any case."""
    return [m.name for m in _ours()]


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def resolve(name: str) -> records.Method:
    """The record of the slimopt method ``name`` names: its launcher name (``"galore-slimopt"``)
    or its class name (``"GaLore"``), any case, ``-`` and ``_`` ignored."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {type(name).__name__}")
    for method in _ours():
        if _key(name) in (_key(method.name), _key(method.build.__name__)):
            return method
    classes = [m.build.__name__ for m in _ours()]
    raise ValueError(f"unknown slimopt optimizer {name!r}; known: {', '.join(list_optimizers())} "
                     f"(or their class names: {', '.join(classes)})")


def create_optimizer(model: torch.nn.Module, name: str, lr: float | None = None,
                     rank: int | None = None, targets=None, **options) -> torch.optim.Optimizer:
    """The slimopt optimizer ``name`` (see ``list_optimizers()``) for ``model``, with the
    method's own split:

    * most methods: ``param_groups(model, rank, targets=targets)``: the linear layers that
      ``targets`` picks (default: every linear except embeddings and the output head) take the
      matrix rule, everything else AdamW;
    * SNSM, SubspaceMomentum, SubsetNorm: the same with the output head in the matrix group;
    * AdaPreLoRA: the model itself (it finds its LoRA pairs); ``targets`` is refused.

    ``rank`` goes to the matrix group of the ranked methods and is ignored by the others
    (ROOT, SubsetNorm, AdaPreLoRA); ``lr`` and ``rank`` left at None keep the class defaults.
    ``options`` go to the optimizer's constructor (``weight_decay``, ``update_interval``, ...).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer expects an nn.Module, got {type(model).__name__}")
    method = resolve(name)
    if lr is not None:
        options["lr"] = lr
    if method.split == records.LORA_PAIRS:
        if targets is not None:
            raise ValueError(f"{method.build.__name__} finds the model's LoRA pairs itself; "
                             "targets does not apply (choose the LoRA modules in the LoRA config)")
        return method.build(model, **options)
    groups = param_groups(model, rank=rank if method.ranked else None, targets=targets,
                          include_head=method.split == records.MATRICES_AND_HEAD)
    return method.build(groups, **options)


class HFOptimizerFactory:
    """A slimopt optimizer for Hugging Face's ``Trainer``, with the method's split::

        Trainer(model=model, args=args, train_dataset=data,
                optimizer_cls_and_kwargs=(slimopt.HFOptimizerFactory("grasswalk"),
                                          {"lr": 1e-3, "rank": 128, "weight_decay": 0.0}))

    transformers (5.x) treats a first element that is not an ``Optimizer`` class as a factory:
    it calls it with no arguments, then calls what that returns with ``(model, **kwargs)``.
    Both calls land here: with no arguments the factory returns itself; with a model it returns
    ``create_optimizer(model, name, **defaults, **kwargs)``. ``defaults`` given here
    (``targets=...``, ``update_interval=...``) are overridden by the Trainer's kwargs.
    ``TrainingArguments.learning_rate`` and ``weight_decay`` do not reach a factory: put ``lr``
    (and ``weight_decay``) in the kwargs; the Trainer's LR schedule then scales that ``lr``.
    """

    def __init__(self, name: str, **defaults):
        self.method = resolve(name)  # an unknown name fails here, not inside Trainer.train()
        self.defaults = defaults

    def __call__(self, model: torch.nn.Module | None = None, **kwargs):
        if model is None:
            if kwargs:
                raise TypeError("HFOptimizerFactory(...)(model, **kwargs): the model is missing")
            return self
        return create_optimizer(model, self.method.name, **{**self.defaults, **kwargs})

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.defaults.items())
        return f"HFOptimizerFactory({self.method.name!r}{options})"
