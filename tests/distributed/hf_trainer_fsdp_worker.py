"""One rank (of 2, CPU, gloo) of ``SlimoptTrainer`` with FSDP2 (``fsdp="full_shard"``,
``fsdp_config={"version": 2}``) and ``optimizer_cls_and_kwargs=(slimopt.HFOptimizerFactory(
"grasswalk", ...), {...})`` (``tests/test_hf_trainer.py``). accelerate 1.15 ignores the FSDP
plugin on the CPU (``AcceleratorState`` sets ``DistributedType.FSDP`` only on accelerators); the
worker's Trainer puts it in force after building the Accelerator, so accelerate's own FSDP2
prepare runs on gloo. ``argv[1]``: ``slim`` (``SlimoptTrainer``) or ``plain``
(``transformers.Trainer``); ``argv[2]``: output folder for ``result{rank}.pt``."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import slimopt  # noqa: E402
from hf_common import Tokens, tiny_llama, training_args, weights  # noqa: E402
from slimopt.integrations.transformers import SlimoptTrainer  # noqa: E402

STEPS = 3


def forced(cls):
    class Forced(cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if getattr(self.accelerator.state, "fsdp_plugin", None) is None and \
                    self.accelerator.num_processes > 1:
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
                plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.accelerator.state.distributed_type = DistributedType.FSDP
                self.accelerator.state.fsdp_plugin = plugin
                self.is_fsdp_enabled = True
    return Forced


def main(scenario, out):
    torch.set_num_threads(1)
    model = tiny_llama()
    initial = weights(model)
    factory = slimopt.HFOptimizerFactory("grasswalk", update_interval=2)
    args = training_args(out, STEPS, fsdp="full_shard",
                         fsdp_config={"version": 2, "transformer_layer_cls_to_wrap":
                                      ["LlamaDecoderLayer"], "reshard_after_forward": True},
                         lr_scheduler_type="constant")
    cls = forced(SlimoptTrainer if scenario == "slim" else transformers.Trainer)
    trainer = cls(model=model, args=args, train_dataset=Tokens(4 * STEPS),
                  optimizer_cls_and_kwargs=(factory, {"lr": 1e-3, "rank": 4}))
    result = {"scenario": scenario, "distributed_type": str(trainer.accelerator.distributed_type)}
    try:
        trainer.train()
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    opt = trainer.optimizer
    while getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    result["optimizer"] = type(opt).__name__
    result["router"] = type(getattr(opt, "step_router", None)).__name__
    result["state_keys"] = sorted({k for s in opt.state.values() for k in s})
    result["initial"] = initial
    result["weights"] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                         .float().clone() for n, p in trainer.model.named_parameters()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
