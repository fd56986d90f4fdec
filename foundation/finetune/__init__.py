"""Fine-tuning: a pretrained model (directory or Hub id at a pinned revision) -> a model trained on new data,
right at step 0 (full, frozen backbone, LoRA or multi-head replay; new heads and elements by model surgery)."""
from .config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "load_finetune_config", "finetune"]


def __getattr__(name):
    if name == "finetune":
        from .run import finetune
        return finetune
    raise AttributeError(f"module 'foundation.finetune' has no attribute {name!r}")
