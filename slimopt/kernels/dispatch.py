"""Which implementation a kernel call uses: ``"triton"`` or ``"torch"``.

CUDA tensors use Triton when it is installed, everything else the pure-torch reference. The
environment variable ``SLIMOPT_KERNELS=torch|triton`` overrides; ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` (Triton's interpreter, how the kernels are tested without a GPU).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend(*tensors: torch.Tensor) -> str:
    """The backend for a call on ``tensors`` (see the module docstring)."""
    forced = os.environ.get("SLIMOPT_KERNELS", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"SLIMOPT_KERNELS must be one of {list(BACKENDS)}, got {forced!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("SLIMOPT_KERNELS=triton but triton is not installed "
                               "(pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError("SLIMOPT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(Triton's interpreter); unset SLIMOPT_KERNELS to use torch")
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"
