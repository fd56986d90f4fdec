"""``foundation evaluate MODEL DATA``: MAE/RMSE per property (per dataset and head) and parity plots.

MODEL is a directory written by ``save_pretrained`` or a Hub id (``FoundationModel.from_pretrained``), or an
``nn.Module`` with the model interface. DATA is one or more LMDB dataset directories (``foundation data
convert``) or ASE-readable files (extxyz, ASE db, ...; labels read as in ``foundation.data.labels``).
Inference runs in one process, no DeepSpeed needed; forces (and stress when labelled) come from autograd.

``predict`` is the one loop over datasets that everything else uses: this command, fine-tuning's zero-shot tables
and the closing E0 refit of training (``train/refit.py``).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import keys
from .data.files import open_eval_data
from .train.data import make_eval_loader
from .train.metrics import UNITS, MetricAccumulator, format_table


@dataclass
class Predictions:
    """What ``predict`` returns: ``metrics`` (``MetricAccumulator.result()``), and for every structure with an
    energy label its element numbers ``numbers`` ((n,) arrays), ``labels`` (S,) eV and ``preds`` (S,) eV."""
    metrics: dict
    numbers: list = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    preds: np.ndarray = field(default_factory=lambda: np.zeros(0))


def predict(model, datasets: list, head_names: list[str] | None = None, max_atoms: int = 256, device=None,
            forces: bool = True, on_batch: Callable[[dict, object], None] | None = None) -> Predictions:
    """Run ``model`` over every structure of ``datasets`` once (items carry their head index); stress is predicted
    for batches that carry stress labels. ``on_batch(pred, batch)`` sees every batch (e.g. to collect parity pairs).
    Predictions are detached (forces need autograd, so this does not run under ``no_grad``); the model's
    train/eval mode is restored afterwards."""
    device = device if device is not None else next(model.parameters()).device
    names = [getattr(d, "name", None) or f"data{i}" for i, d in enumerate(datasets)]
    acc = MetricAccumulator(names, head_names or _head_names(model))
    numbers, labels, preds = [], [], []
    was_training = model.training
    model.eval()
    try:
        for batch in make_eval_loader(datasets, max_atoms, rank=0, world=1):
            batch = batch.to(device)
            stress = forces and keys.STRESS in batch   # some structures of a dataset may lack stress (slabs)
            pred = model(batch, compute_forces=forces, compute_stress=stress, training=False)
            pred = {k: v.detach() for k, v in pred.items()}
            acc.update(pred, batch)
            if on_batch is not None:
                on_batch(pred, batch)
            if keys.ENERGY in batch:
                _energies(batch, pred, numbers, labels, preds)
    finally:
        model.train(was_training)
    return Predictions(acc.result(), numbers, np.asarray(labels, np.float64), np.asarray(preds, np.float64))


def _energies(batch, pred: dict, numbers: list, labels: list, preds: list) -> None:
    """Append (element numbers, label, prediction) of every structure of ``batch`` with an energy label."""
    z, ptr = batch[keys.ATOMIC_NUMBERS].cpu().numpy(), batch.ptr.cpu().numpy()
    e = batch[keys.ENERGY].reshape(-1).double().cpu().numpy()
    p = pred[keys.ENERGY].reshape(-1).double().cpu().numpy()
    for s in np.flatnonzero(np.isfinite(e)):
        numbers.append(z[ptr[s]:ptr[s + 1]])
        labels.append(e[s])
        preds.append(p[s])


def load_model(model, device: str = "cpu"):
    """A module ready for inference from a path / Hub id (``FoundationModel.from_pretrained``) or a module."""
    if isinstance(model, torch.nn.Module):
        return model.to(device)
    from .model import FoundationModel
    return FoundationModel.from_pretrained(str(model)).to(device)


def _head_names(model) -> list[str]:
    heads = getattr(getattr(model, "config", None), "heads", None)
    return list(heads) if heads else ["default"]


def evaluate(model, data: str | Path | Sequence[str | Path], *, max_atoms: int = 512, device: str = "cpu",
             plot: str | Path | None = None, json_path: str | Path | None = None,
             dtype: torch.dtype | None = None, head: str | None = None) -> dict:
    """Metrics {"dataset/head/property": {"mae", "rmse", "count"}, "all/property": ...} of ``model`` on ``data``.

    ``plot``: write parity plots (energy per atom, forces, stress) to this PNG; ``json_path``: write the metrics.
    ``dtype``: float dtype of the structures (default: the model's parameter dtype); ``head``: readout head name
    (default: the model's first).
    """
    module = load_model(model, device)
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    dtype = dtype or next(module.parameters()).dtype
    names = _head_names(module)
    if head is not None and head not in names:
        raise ValueError(f"unknown head {head!r}; this model has heads {names}")
    datasets = open_eval_data(paths, float(module.config.r_max), dtype, 0 if head is None else names.index(head))
    pairs: dict[str, tuple[list, list]] = {"energy_per_atom": ([], []), keys.FORCES: ([], []), keys.STRESS: ([], [])}
    result = predict(module, datasets, names, max_atoms, device,
                     on_batch=lambda pred, batch: _collect(pairs, pred, batch)).metrics
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plot is not None:
        from .train.plots import parity
        parity({k: (np.concatenate(r) if r else np.zeros(0), np.concatenate(p) if p else np.zeros(0))
                for k, (r, p) in pairs.items()}, plot, units=UNITS)
    return result


def _collect(pairs: dict, pred: dict, batch) -> None:
    """Append labelled (reference, prediction) values of one batch for the parity plots."""
    for name, (refs, preds) in pairs.items():
        key = keys.ENERGY if name == "energy_per_atom" else name
        if key not in batch or key not in pred:
            continue
        ref = batch[key].detach().cpu().double()
        mask = torch.isfinite(ref.reshape(ref.shape[0], -1)).all(1)
        p = pred[key].detach().cpu().double().reshape(ref.shape)[mask]
        r = ref[mask]
        if name == "energy_per_atom":
            n = batch[keys.NATOMS].reshape(-1).cpu().double()[mask]
            r, p = r / n, p / n
        refs.append(r.reshape(-1).numpy())
        preds.append(p.reshape(-1).numpy())


def main(model: str, data: Sequence[str], plot: str | None, json_path: str | None, max_atoms: int,
         device: str, head: str | None = None) -> str:
    """What ``foundation evaluate`` prints: the metrics table (MAE/RMSE x 1000, i.e. meV-based units)."""
    return format_table(evaluate(model, data, max_atoms=max_atoms, device=device, plot=plot, json_path=json_path,
                                 head=head))
