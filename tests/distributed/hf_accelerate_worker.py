"""One torchrun rank of accelerate + DeepSpeed ZeRO-2 with a slimopt optimizer
(``tests/test_accelerate.py``): ``hf_common.accelerate_loop`` (gradient accumulation 2, clipping
by DeepSpeed's ``gradient_clipping``). ``argv[1]``: ``bridge`` (``slimopt.integrations.
accelerate.prepare``) or ``plain`` (``accelerator.prepare``); ``argv[2]``: output folder for
``result.pt`` (optimizer chain, state keys, final weights or the error)."""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from accelerate import Accelerator, DeepSpeedPlugin  # noqa: E402

from hf_common import (accelerate_loop, grasswalk, loader, optimizer_chain,  # noqa: E402
                       save_result, schedule, tiny_llama, weights)
from slimopt.integrations.accelerate import prepare  # noqa: E402


def main(scenario, out):
    torch.set_num_threads(1)
    model = tiny_llama()
    initial = weights(model)
    opt = grasswalk(model)
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2,
              "bf16": {"enabled": False}}
    accelerator = Accelerator(gradient_accumulation_steps=2,
                              deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    result = {"scenario": scenario}
    objects = (model, opt, loader(16), schedule(opt))
    try:
        prepared = prepare(accelerator, *objects) if scenario == "bridge" \
            else accelerator.prepare(*objects)
        engine, p_opt, p_loader, p_sched = prepared
        result["steps"] = accelerate_loop(accelerator, engine, p_opt, p_sched, p_loader)
        result["chain"] = optimizer_chain(p_opt)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    result["state_keys"] = sorted({k for s in opt.state.values() for k in s})
    save_result(result, model, initial, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
