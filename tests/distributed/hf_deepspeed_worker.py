"""One torchrun rank of HF Trainer + DeepSpeed ZeRO with a slimopt optimizer
(``tests/test_hf_trainer.py``). ``argv[1]``: scenario, ``argv[2]``: output folder; writes
``result.pt`` there: the optimizer chain in effect, state keys, final weights or the error.

- ``plain``: ``transformers.Trainer(optimizers=(GrassWalk, None))``, the slimopt optimizer
  watched by ``slimopt.integrations.bypass`` (as every slimopt optimizer is);
- ``plain_unwatched``: the same with the guard removed (``bypass.unwatch``: what transformers
  does on its own);
- ``slim``: ``SlimoptTrainer(optimizers=(GrassWalk, None))``;
- ``slim_factory``: ``SlimoptTrainer(optimizer_cls_and_kwargs=(factory, {}))``;
- ``slim_z3``: ``SlimoptTrainer(optimizers=(GrassWalk, None))`` under ZeRO-3;
- ``slim_ds_optimizer``: ``SlimoptTrainer`` with an ``"optimizer"`` section in the config;
- ``slim_resume``: ``SlimoptTrainer`` for 4 steps saving every 2 (DeepSpeed checkpoints, the
  bridge's per-rank state; ``uninterrupted``: its weights), then a fresh ``SlimoptTrainer``
  resuming from ``checkpoint-2`` to step 4.
"""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import transformers  # noqa: E402

from hf_common import (Tokens, grasswalk, optimizer_chain, save_result,  # noqa: E402
                       tiny_llama, training_args, weights, zero_config)
from slimopt.integrations import bypass  # noqa: E402
from slimopt.integrations.transformers import SlimoptTrainer  # noqa: E402

STEPS = 4


class Factory:
    def __call__(self, model, **kw):
        return grasswalk(model)


def main(scenario, out):
    torch.set_num_threads(1)
    model = tiny_llama()
    initial = weights(model)
    config = zero_config(3 if scenario == "slim_z3" else 2)
    result = {"scenario": scenario}
    kw = {}
    if scenario.startswith("plain"):
        cls = transformers.Trainer
        opt = grasswalk(model)  # every slimopt optimizer is watched from construction on
        if scenario == "plain_unwatched":
            bypass.unwatch(opt)  # what transformers does on its own, without the guard
        kw["optimizers"] = (opt, None)
        del opt
    elif scenario == "slim_factory":
        cls = SlimoptTrainer
        kw["optimizer_cls_and_kwargs"] = (Factory, {})
    else:
        cls = SlimoptTrainer
        kw["optimizers"] = (grasswalk(model), None)
        if scenario == "slim_ds_optimizer":
            config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    resume = scenario == "slim_resume"
    extra = dict(save_strategy="steps", save_steps=2) if resume else {}
    args = training_args(out, STEPS, deepspeed=config, **extra)
    trainer = cls(model=model, args=args, train_dataset=Tokens(), **kw)
    try:
        trainer.train()
        if resume:  # a fresh model, optimizer and Trainer, on from checkpoint-2
            result["uninterrupted"] = weights(model)
            model = tiny_llama()
            args = training_args(out, STEPS, deepspeed=zero_config(2), **extra)
            trainer = cls(model=model, args=args, train_dataset=Tokens(),
                          optimizers=(grasswalk(model), None))
            trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    except Exception as err:  # the refusals are the result
        result["error"] = f"{type(err).__name__}: {err}"
    result["chain"] = optimizer_chain(trainer.optimizer)
    inner = trainer.optimizer
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    result["state_keys"] = sorted({k for s in getattr(inner, "state", {}).values()
                                   for k in s})
    final = None
    if scenario == "slim_z3":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            final = weights(model)
    save_result(result, model, initial, out, final)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
