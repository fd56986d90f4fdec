"""Training: ``TrainConfig`` recipes, the loss, metrics, the DeepSpeed engine, checkpoints, the loop, evaluation.

``foundation.train.engine`` is the only module that imports ``deepspeed``; importing this package does not.
"""
from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "run", "evaluate"]


def __getattr__(name):
    if name == "run":
        from .loop import run
        return run
    if name == "evaluate":
        from .evaluate import evaluate
        return evaluate
    raise AttributeError(f"module 'foundation.train' has no attribute {name!r}")
