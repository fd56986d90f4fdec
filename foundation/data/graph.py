"""Atoms -> PyG ``Data``: the neighbor list and the one graph representation used everywhere.

The data loader (``ShardedDataset``), the ASE calculator and the tests all build graphs here, so a structure
gives the same edges, in the same order, wherever it comes from.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import vesin
from ase import Atoms
from torch_geometric.data import Data

from .. import keys
from .labels import read_labels


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, r_max: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (sender, receiver, image) with |r| < r_max, excluding an atom and itself in the same image.

    positions (n,3) Å; cell (3,3) Å, rows are lattice vectors (may be zero along non-periodic directions);
    pbc (3,) bool. Works for cells of any shape, including cells smaller than r_max (an atom then sees its
    own periodic images). Returns edge_index (2,E) int64 sorted by receiver then sender, and unit_shifts
    (E,3) float64 such that r = pos[recv] - pos[send] + unit_shifts @ cell.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if len(positions) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.float64)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12 and np.any(np.abs(cell[pbc]).sum(1) < 1e-12):
        raise ValueError("periodic boundary conditions along a lattice vector of zero length; "
                         "set the cell or turn pbc off along that direction")
    nl = vesin.NeighborList(cutoff=float(r_max), full_list=True)
    send, recv, unit = nl.compute(positions, cell if pbc.any() else np.zeros((3, 3)), pbc.tolist(), "ijS")
    send = send.astype(np.int64)
    recv = recv.astype(np.int64)
    unit = unit.astype(np.float64)
    keep = ~((send == recv) & ~unit.any(axis=1))
    send, recv, unit = send[keep], recv[keep], unit[keep]
    order = np.lexsort((unit[:, 2], unit[:, 1], unit[:, 0], send, recv))
    return np.stack([send[order], recv[order]]), unit[order]


def build_graph(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, r_max: float | None,
                labels: Mapping[str, np.ndarray] | None = None, head: int = 0, dataset_index: int = 0,
                dtype: torch.dtype | None = None) -> Data:
    """One structure as a ``Data`` with the fields of ``foundation.keys``: structure fields (positions, cell,
    shifts, total charge) in ``dtype``, labels always float64 (a total energy keeps its digits until the model's
    float64 E0 sum is subtracted from it in the loss; docs/precision.md).

    ``labels`` holds float64 arrays as returned by ``read_labels`` (total_charge included, default 0).
    With ``r_max=None`` no neighbor list is built (edge fields are added later, e.g. by the dataset).
    """
    dtype = dtype or torch.get_default_dtype()
    labels = dict(labels or {})
    n = len(numbers)
    positions = np.asarray(positions, np.float64).reshape(n, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    charge = np.asarray(labels.pop(keys.TOTAL_CHARGE, 0.0), dtype=np.float64).reshape(1)
    ints = torch.from_numpy(np.array([n, head, dataset_index], dtype=np.int64))
    fields = {
        keys.POSITIONS: torch.as_tensor(positions, dtype=dtype),
        keys.ATOMIC_NUMBERS: torch.as_tensor(np.asarray(numbers, np.int64).reshape(n)),
        keys.CELL: torch.as_tensor(cell.reshape(1, 3, 3), dtype=dtype),
        keys.PBC: torch.as_tensor(pbc.reshape(1, 3)),
        keys.NATOMS: ints[0:1],
        keys.TOTAL_CHARGE: torch.as_tensor(charge, dtype=dtype),
        keys.HEAD: ints[1:2],
        keys.DATASET: ints[2:3],
    }
    for name, value in labels.items():
        a = np.asarray(value, dtype=np.float64)
        fields[name] = torch.as_tensor(a.reshape(1, *a.shape) if name in keys.PER_STRUCTURE_KEYS else a,
                                       dtype=torch.float64)
    fields["num_nodes"] = n
    if r_max is not None:  # from the float64 inputs, so a low-precision dtype cannot change the edge set
        edge_index, unit_shifts = neighbor_list(positions, cell, pbc, r_max)
        fields[keys.EDGE_INDEX] = torch.from_numpy(edge_index)
        fields[keys.SHIFTS] = torch.as_tensor(unit_shifts @ cell, dtype=dtype)
    return _new_data(fields)


def _new_data(fields: dict) -> Data:
    """``Data(**fields)`` without PyG's per-attribute bookkeeping (a fresh Data has no caches to invalidate)."""
    data = Data()
    mapping = getattr(getattr(data, "_store", None), "_mapping", None)
    if isinstance(mapping, dict) and not mapping:
        mapping.update(fields)
    else:  # pragma: no cover - other PyG internals
        for key, value in fields.items():
            data[key] = value
    return data


def add_edges(data: Data, r_max: float) -> Data:
    """Compute the neighbor list of ``data`` at cutoff ``r_max`` (Å) and set edge_index (2,E) and shifts (E,3) Å.

    Uses the positions as stored on ``data`` (build_graph uses the float64 inputs instead).
    """
    pos = data[keys.POSITIONS].detach().cpu().double().numpy()
    cell = data[keys.CELL].detach().cpu().double().numpy().reshape(3, 3)
    pbc = data[keys.PBC].cpu().numpy().reshape(3)
    edge_index, unit_shifts = neighbor_list(pos, cell, pbc, r_max)
    data[keys.EDGE_INDEX] = torch.from_numpy(edge_index)
    data[keys.SHIFTS] = torch.from_numpy(unit_shifts @ cell).to(data[keys.POSITIONS].dtype)
    return data


def from_atoms(atoms: Atoms, r_max: float | None, *, key_map: Mapping[str, str] | None = None, head: int = 0,
               dataset_index: int = 0, with_labels: bool = True, dtype: torch.dtype | None = None) -> Data:
    """The ``Data`` for an ``ase.Atoms``: structure, labels it carries, neighbor list at ``r_max`` (Å).

    Labels come from ``read_labels`` (calculator results or info/arrays; ``key_map`` renames). The total
    charge is taken from ``atoms.info["charge"]`` (or ``total_charge``), default 0.
    """
    labels = read_labels(atoms, key_map) if with_labels else {keys.TOTAL_CHARGE: read_labels(atoms, {})[keys.TOTAL_CHARGE]}
    return build_graph(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, r_max, labels,
                       head=head, dataset_index=dataset_index, dtype=dtype)
