import subprocess
import sys


def test_import_never_registers_with_torch_optim():
    code = ("import torch, slimopt; print(hasattr(torch.optim, 'GrassWalk')); "
            "slimopt.register_with_torch_optim(); print(torch.optim.GrassWalk is slimopt.GrassWalk)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
