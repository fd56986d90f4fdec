"""``foundation evaluate MODEL DATA``: MAE/RMSE per property (per dataset and head) and parity plots.

MODEL is a directory written by ``save_pretrained`` or a Hub id (``FoundationModel.from_pretrained``), or an
``nn.Module`` with the model interface. DATA is one or more LMDB dataset directories (``foundation data
convert``) or ASE-readable files (extxyz, ASE db, ...; labels read as in ``foundation.data.labels``).
Inference runs in one process, no DeepSpeed needed; forces (and stress when labelled) come from autograd.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import keys
from .data import make_eval_loader
from .metrics import UNITS, MetricAccumulator, format_table


class AtomsDataset(torch.utils.data.Dataset):
    """Structures of an ASE-readable file as graphs at ``r_max`` (Å), labels included; ``natoms`` per structure."""

    def __init__(self, path: Path, r_max: float, dtype: torch.dtype | None = None, head: int = 0):
        from ase.io import read

        from ..data import from_atoms
        frames = read(str(path), ":")
        if not frames:
            raise ValueError(f"{path} holds no structures")
        self.items = [from_atoms(a, r_max=r_max, dtype=dtype, head=head) for a in frames]
        self.natoms = np.array([len(a) for a in frames], np.int64)
        self.name = path.stem

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def open_eval_data(paths: Sequence[str | Path], r_max: float, dtype: torch.dtype | None = None, head: int = 0) -> list:
    """One dataset per path: ``ShardedDataset`` for a directory, ``AtomsDataset`` for a file (floats in ``dtype``,
    every structure evaluated with readout head index ``head``)."""
    from ..data import ShardedDataset
    out = []
    for i, p in enumerate(Path(p) for p in paths):
        if p.is_dir():
            ds = ShardedDataset(p, r_max=r_max, dataset_index=i, dtype=dtype, head=head)
            ds.name = (ds.manifest or {}).get("name") or p.name
        elif p.is_file():
            ds = AtomsDataset(p, r_max, dtype, head)
        else:
            raise FileNotFoundError(f"evaluation data {str(p)!r} not found; give a dataset directory "
                                    "('foundation data convert') or an ASE-readable file")
        out.append(ds)
    return out


def load_model(model, device: str = "cpu"):
    """A module ready for inference from a path / Hub id (``FoundationModel.from_pretrained``) or a module."""
    if isinstance(model, torch.nn.Module):
        return model.to(device)
    from ..model import FoundationModel
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
    module.eval()
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    dtype = dtype or next(module.parameters()).dtype
    names = _head_names(module)
    if head is not None and head not in names:
        raise ValueError(f"unknown head {head!r}; this model has heads {names}")
    datasets = open_eval_data(paths, float(module.config.r_max), dtype, 0 if head is None else names.index(head))
    acc = MetricAccumulator([d.name for d in datasets], names)
    pairs: dict[str, tuple[list, list]] = {"energy_per_atom": ([], []), keys.FORCES: ([], []), keys.STRESS: ([], [])}
    stress = any(keys.STRESS in d[0] for d in datasets)
    for batch in make_eval_loader(datasets, max_atoms, rank=0, world=1):
        batch = batch.to(device)
        pred = module(batch, compute_forces=True, compute_stress=stress, training=False)
        pred = {k: v.detach() for k, v in pred.items()}
        acc.update(pred, batch)
        _collect(pairs, pred, batch)
    result = acc.result()
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plot is not None:
        from .plots import parity
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
