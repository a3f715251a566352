"""Entry points for training: the optimizer registry (names -> classes) used by the examples,
and later the DeepSpeed glue and the pretraining CLI."""
from .registry import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "build_optimizer"]
