"""``foundation pretrain RECIPE.yaml``: train a model from scratch with the DeepSpeed ``Trainer``."""
from __future__ import annotations

from pathlib import Path

from .config import load_config
from .data import check_loss_labels
from .loop import Trainer
from .metrics import format_table


def main(recipe: str, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> str | None:
    """Load the recipe, train, return the final metrics table (rank 0; None on the other ranks).

    ``resume``: continue from the checkpoints in ``out_dir``; ``overwrite``: delete them and start again (an
    ``out_dir`` holding checkpoints is refused without one of the two)."""
    config = load_config(recipe, overrides)
    check_loss_labels(config)
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    metrics = trainer.fit()
    if trainer.rank != 0:
        return None
    exported = Path(config.out_dir) / "model"
    head = f"model exported to {exported}\n" if (exported / "config.json").is_file() else ""
    return head + (format_table(metrics) if metrics else "")
