"""Training: ``TrainConfig`` recipes, the loss, metrics, the DeepSpeed engine, checkpoints and the loop.

``foundation.train.engine`` is the only module that imports ``deepspeed``; importing this package does not.
"""
from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "Trainer", "run"]


def __getattr__(name):
    if name in ("Trainer", "run"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'foundation.train' has no attribute {name!r}")
