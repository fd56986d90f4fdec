"""Datasets for evaluation: an ASE-readable file held in memory as graphs, or a converted LMDB directory.

``open_eval_data(paths, r_max)`` gives one dataset per path, each item a PyG ``Data`` with labels (the same
fields as ``ShardedDataset``), so that evaluation, fine-tuning tables and monitors read either kind of input.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class AtomsDataset(torch.utils.data.Dataset):
    """Structures of an ASE-readable file as graphs at ``r_max`` (Å), labels included; ``natoms`` per structure."""

    def __init__(self, path: str | Path, r_max: float, dtype: torch.dtype | None = None, head: int = 0):
        from .graph import from_atoms
        from .readers import read_atoms
        path = Path(path)
        frames = read_atoms(path)
        if not frames:
            raise ValueError(f"{path} holds no structures")
        self.items = [from_atoms(a, r_max=r_max, dtype=dtype, head=head) for a in frames]
        self.natoms = np.array([len(a) for a in frames], np.int64)
        self.name = path.name.split(".")[0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def open_eval_data(paths: Sequence[str | Path], r_max: float, dtype: torch.dtype | None = None, head: int = 0) -> list:
    """One dataset per path: ``ShardedDataset`` for a directory, ``AtomsDataset`` for a file (floats in ``dtype``,
    every structure evaluated with readout head index ``head``)."""
    from .dataset import ShardedDataset
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
