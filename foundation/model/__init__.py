"""The model: ``ModelConfig`` (its whole identity), presets, and the ``FoundationModel`` backbone."""
from .backbone import FoundationModel
from .config import ModelConfig
from .presets import PRESETS

__all__ = ["FoundationModel", "ModelConfig", "PRESETS"]
