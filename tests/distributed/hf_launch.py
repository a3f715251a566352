"""Launching an HF worker of this folder under torchrun and reading its result files, for
``tests/test_hf_trainer.py`` and ``tests/test_accelerate.py``."""
import os
import subprocess
import sys

import torch

from net import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)


def torchrun_results(worker, scenario, out, ranks=1, env=()):
    """Run ``worker`` (a file name here) with ``scenario`` and ``out`` on ``ranks`` CPU ranks
    (DeepSpeed's CPU accelerator, one thread, a free rendezvous port); returns rank 0's result,
    or every rank's, from the ``result*.pt`` files the worker writes to ``out``."""
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS),
                                                os.environ.get("PYTHONPATH", "")]), **dict(env))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), os.path.join(HERE, worker), scenario, str(out)]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    names = ["result.pt"] if ranks == 1 else [f"result{r}.pt" for r in range(ranks)]
    for name in names:
        assert (out / name).exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    # the workers' own files (they hold Python objects besides tensors)
    results = [torch.load(out / name, weights_only=False) for name in names]
    return results[0] if ranks == 1 else results
