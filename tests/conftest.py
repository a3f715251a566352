import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET once, when it is first imported, and several test modules import
# it indirectly (peft, the peer optimizers): set it before any test module is collected, so the
# kernel tests run under the interpreter whatever order pytest collects them in. Without
# SLIMOPT_KERNELS=triton, CPU tensors use the torch path either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
