"""Entry points for training: the optimizer registry (names -> classes), the DeepSpeed glue
(``initialize``, ``load_resharded``) and the pretraining CLI (``slimopt.launch.pretrain``)."""
from .registry import OPTIMIZERS, build_optimizer


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with slimopt optimizers (see ``slimopt.distributed.deepspeed``)."""
    from ..distributed.deepspeed import initialize as _initialize
    return _initialize(*args, **kwargs)


def load_resharded(engine, source, tag=None):
    """Load a slimopt ZeRO checkpoint written at any world size (see
    ``slimopt.launch.zero_checkpoint``)."""
    from .zero_checkpoint import load_resharded as _load
    return _load(engine, source, tag)


__all__ = ["OPTIMIZERS", "build_optimizer", "initialize", "load_resharded"]
