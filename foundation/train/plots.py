"""Figures: the learning curve of a run and parity plots of predictions against labels (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .csvlog import read_csv


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 120, tight: bool = True) -> Path:
    """Lay out ``fig`` (``tight_layout``, unless the caller placed the axes), write it to ``path`` (parent folders
    created) and close it; returns the path."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def learning_curve(train_csv, valid_csv, out_png) -> Path | None:
    """Training loss (log scale) and validation MAEs against step, from the run's CSV logs. None if no data."""
    train, valid = read_csv(train_csv), read_csv(valid_csv)
    if not train:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for key in [k for k in train if k == "loss" or k.startswith("loss_")]:
        ax.plot(train["step"], train[key], label=key, lw=1.2 if key == "loss" else 0.8)
    if "valid/loss" in valid:
        ax.plot(valid["step"], valid["valid/loss"], "o-", label="valid loss", ms=3)
    ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="loss")
    ax.legend(fontsize=7)
    ax = axes[1]
    maes = [k for k in valid if k.startswith("valid/all/") and k.endswith("_mae")]
    for key in maes:
        ax.plot(valid["step"], valid[key], "o-", ms=3, label=key.removeprefix("valid/all/"))
    ax.set(xlabel="optimizer step", ylabel="MAE (eV/atom, eV/Å, eV/Å³)", yscale="log", title="validation (EMA)")
    if maes:
        ax.legend(fontsize=7)
    # fixed margins: every training run draws this figure, and tight_layout would double its cost (0.4 -> 0.8 s)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.25)
    return save_figure(fig, out_png, tight=False)


def parity(pairs: dict[str, tuple[np.ndarray, np.ndarray]], out_png, units: dict[str, str] | None = None) -> Path:
    """One parity panel per property: {"forces": (reference (k,), predicted (k,)), ...}."""
    plt = _pyplot()
    pairs = {k: v for k, v in pairs.items() if len(v[0])}
    if not pairs:
        raise ValueError("nothing to plot: the dataset has no labels the model predicts")
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (name, (ref, pred)) in zip(axes[0], pairs.items()):
        ref, pred = np.asarray(ref, float), np.asarray(pred, float)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.scatter(ref, pred, s=4, alpha=0.5)
        mae = float(np.mean(np.abs(pred - ref)))
        unit = (units or {}).get(name, "")
        ax.set(xlabel=f"reference {name} ({unit})", ylabel=f"predicted {name} ({unit})",
               title=f"{name}: MAE {mae:.4g} {unit}")
        ax.set_aspect("equal", adjustable="datalim")
    return save_figure(fig, out_png)
