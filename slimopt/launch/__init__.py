"""Entry points for training: the optimizer registry (names -> classes) used by the examples,
and later the DeepSpeed glue and the pretraining CLI."""
from .registry import OPTIMIZERS, build_optimizer


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with slimopt optimizers (see ``slimopt.launch.zero``)."""
    from .zero import initialize as _initialize
    return _initialize(*args, **kwargs)


__all__ = ["OPTIMIZERS", "build_optimizer", "initialize"]
