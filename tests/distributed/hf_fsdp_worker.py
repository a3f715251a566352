"""One rank (of 2, CPU, gloo) of accelerate with FSDP2 (``FullyShardedDataParallelPlugin(
fsdp_version=2)``) and a slimopt optimizer (``tests/test_accelerate.py``). ``argv[1]``:
``bridge`` (``slimopt.integrations.accelerate.prepare``) or ``plain`` (``accelerator.prepare``);
``argv[2]``: output folder. Rank r writes ``result{r}.pt``: the error if any, the state keys it
holds, the router, the final full weights and (rank 0) the one-process reference: the same
3 steps on a batch of 4 (2 per rank), clipping at 1.0, constant learning rate.
``HF_FSDP_FORCE_CPU=1``: accelerate 1.15 ignores an FSDP plugin on the CPU (``AcceleratorState``
sets ``DistributedType.FSDP`` only on accelerators: MULTI_GPU/XPU/NPU/...); the flag puts it in
force after construction so that accelerate's own FSDP2 ``prepare`` (``fully_shard``,
``fsdp2_switch_optimizer_parameters``) runs on gloo."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402

from hf_common import (Tokens, accelerate_loop, grasswalk, hand_loop, schedule,  # noqa: E402
                       tiny_llama, weights)
from slimopt.integrations.accelerate import prepare  # noqa: E402

STEPS = 3


def full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for n, p in model.named_parameters()}


def main(scenario, out):
    torch.set_num_threads(1)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    result = {"scenario": scenario, "world": accelerator.num_processes,
              "plugin_taken": str(accelerator.distributed_type)}
    if os.environ.get("HF_FSDP_FORCE_CPU") and accelerator.num_processes > 1:
        # accelerate 1.15 ignores an FSDP plugin on the CPU (AcceleratorState sets
        # DistributedType.FSDP only on accelerators); put it in force to run accelerate's own
        # FSDP2 prepare (fully_shard + fsdp2_switch_optimizer_parameters) on gloo
        from accelerate.utils import DistributedType
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    result["forced"] = bool(os.environ.get("HF_FSDP_FORCE_CPU"))
    rank = accelerator.process_index
    result["distributed_type"] = str(accelerator.distributed_type)
    model = tiny_llama()
    result["initial"] = weights(model)
    opt = grasswalk(model)
    data = torch.utils.data.DataLoader(Tokens(4 * STEPS), batch_size=2, shuffle=False)
    try:
        objects = (model, opt, data, schedule(opt, None))
        p_model, p_opt, p_data, p_sched = (prepare(accelerator, *objects) if scenario == "bridge"
                                           else accelerator.prepare(*objects))
        result["router"] = type(opt.step_router).__name__
        result["steps"] = accelerate_loop(accelerator, p_model, p_opt, p_sched, p_data)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        p_model = model
    result["state_keys"] = sorted({k for s in opt.state.values() for k in s})
    result["weights"] = full(p_model)
    if rank == 0:
        ref = tiny_llama()
        ref_opt = grasswalk(ref)
        hand_loop(ref, ref_opt, schedule(ref_opt, None),
                  torch.utils.data.DataLoader(Tokens(4 * STEPS), batch_size=4, shuffle=False),
                  accumulation=1)
        result["reference"] = weights(ref)
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
