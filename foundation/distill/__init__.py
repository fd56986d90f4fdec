"""Distillation: a teacher (our model or any ASE calculator) -> a fast student, trained on teacher energies,
forces, stresses and Hessian-vector products, with on-policy rounds and a measured speed/error report."""
from .config import DistillConfig, load_distill_config

__all__ = ["DistillConfig", "load_distill_config", "distill"]


def __getattr__(name):
    if name == "distill":
        from .run import distill
        return distill
    raise AttributeError(f"module 'foundation.distill' has no attribute {name!r}")
