"""foundation: pretrain, fine-tune, distill and publish equivariant machine-learning interatomic potentials.

Public API: ``FoundationModel``, ``ModelConfig``, ``FoundationCalculator`` (imported lazily so that
``import foundation`` stays cheap for the CLI and data tools).
"""
__version__ = "0.1.0"
__all__ = ["FoundationModel", "ModelConfig", "FoundationCalculator", "__version__"]


def __getattr__(name):
    if name in ("FoundationModel", "ModelConfig"):
        from . import model
        return getattr(model, name)
    if name == "FoundationCalculator":
        from .calculator import FoundationCalculator
        return FoundationCalculator
    raise AttributeError(f"module 'foundation' has no attribute {name!r}")
