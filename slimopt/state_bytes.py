"""Count the bytes an optimizer holds in state."""
from __future__ import annotations

import torch


def _inner_tensors(obj: torch.Tensor) -> list | None:
    """The tensors a tensor subclass holds (a DTensor: its local shard; torchao's low-bit
    tensors: their packed codes and scales, through ``__tensor_flatten__``); None for a plain
    tensor."""
    if type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter) and \
            type(obj.data) is torch.Tensor:
        return None
    if hasattr(obj, "to_local") and hasattr(obj, "placements"):
        return [obj.to_local()]
    if hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return [getattr(obj, n) for n in names]
    return None


def _tensor_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        inner = _inner_tensors(obj)
        if inner is not None:  # count what the subclass stores on this rank, not its size
            return sum(_tensor_bytes(t, seen) for t in inner)
        # the view's own address: two views of one storage at different offsets (the 0-d
        # entries of one stacked tensor) are both counted, the same view twice is not
        key = (obj.data_ptr(), obj.device, obj.dtype, obj.shape) if not obj.is_meta else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        # objects kept in state by other libraries (galore-torch's projector holds its basis)
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state``: every tensor counted once (``numel * element_size``),
    including tensors inside objects that other libraries keep there (e.g. galore-torch's
    projector). Python numbers are not counted. Works for any ``torch.optim.Optimizer`` and for
    state allocated on the meta device; a DeepSpeed ZeRO wrapper counts its client optimizer
    (this rank's share of the state; DeepSpeed's own fp32 master weights are not counted).
    Tensor subclasses count what they hold on this rank: a DTensor (FSDP2) its local shard,
    torchao's low-bit tensors their inner tensors (``__tensor_flatten__``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # a DeepSpeed wrapper: count the client optimizer's state
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"state_bytes expects a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    seen: set = set()
    return sum(_tensor_bytes(s, seen) for s in optimizer.state.values())
