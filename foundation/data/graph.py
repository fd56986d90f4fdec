"""Atoms -> PyG ``Data``: the neighbor list and the one graph representation used everywhere.

The data loader (``ShardedDataset``), the ASE calculator and the tests all build graphs here, so a structure
gives the same edges, in the same order, wherever it comes from.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import vesin
from ase import Atoms
from torch_geometric.data import Data

from .. import keys
from .labels import read_labels

MIN_DISTANCE = 0.1  # Å: two atoms closer than this are rejected by `convert` and the calculator
_VESIN_MAX_CELLS = 1e5  # vesin's cap on its cell-list bins; rescaling to it can leave a direction with 0 bins


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, r_max: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (sender, receiver, image) with |r| < r_max, excluding an atom and itself in the same image.

    positions (n,3) Å; cell (3,3) Å, rows are lattice vectors (may be zero along non-periodic directions);
    pbc (3,) bool. Works for cells of any shape, including cells smaller than r_max (an atom then sees its
    own periodic images). Returns edge_index (2,E) int64 sorted by receiver then sender, and unit_shifts
    (E,3) float64 such that r = pos[recv] - pos[send] + unit_shifts @ cell.

    Inputs are validated before the native neighbor list runs (it dies with SIGFPE on some extreme geometries):
    non-finite values raise ``ValueError``; atoms far apart along a non-periodic direction are split into groups
    that cannot interact, each searched on its own, so isolated atoms 10^6 Å apart get a correct (empty) list; a
    cell too elongated for the cell list raises ``ValueError`` naming its face distances.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if len(positions) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.float64)
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(cell)) and np.isfinite(r_max) and r_max > 0):
        raise ValueError("positions, cell and cutoff must be finite (and the cutoff > 0); check the structure")
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12 and np.any(np.abs(cell[pbc]).sum(1) < 1e-12):
        raise ValueError("periodic boundary conditions along a lattice vector of zero length; "
                         "set the cell or turn pbc off along that direction")
    if pbc.any():
        sv = np.linalg.svd(cell[pbc], compute_uv=False)
        if sv.min() <= 1e-9 * sv.max():
            raise ValueError(f"the periodic lattice vectors {np.round(cell[pbc], 6).tolist()} Å are coplanar or "
                             f"parallel (zero cell volume); give three independent lattice vectors, or turn pbc "
                             f"off along the dependent one")
    groups = _separated_groups(positions, cell, pbc, float(r_max))
    parts = [(idx, *_vesin_pairs(positions[idx], cell, pbc, float(r_max))) for idx in groups]
    send = np.concatenate([idx[s] for idx, s, _, _ in parts])
    recv = np.concatenate([idx[r] for idx, _, r, _ in parts])
    unit = np.concatenate([u for _, _, _, u in parts])
    order = np.lexsort((unit[:, 2], unit[:, 1], unit[:, 0], send, recv))
    return np.stack([send[order], recv[order]]), unit[order]


def closest_pair(positions: np.ndarray, cell: np.ndarray, edge_index: np.ndarray, unit_shifts: np.ndarray
                 ) -> tuple[int, int, float] | None:
    """(sender, receiver, distance Å) of the shortest edge of a neighbor list, or None without edges."""
    if edge_index.shape[1] == 0:
        return None
    vec = positions[edge_index[1]] - positions[edge_index[0]] + unit_shifts @ cell
    d = np.linalg.norm(vec, axis=1)
    k = int(np.argmin(d))
    return int(edge_index[0, k]), int(edge_index[1, k]), float(d[k])


def check_min_distance(positions: np.ndarray, cell: np.ndarray, edge_index: np.ndarray, unit_shifts: np.ndarray,
                       ) -> None:
    """Raise ``ValueError`` when two atoms (or an atom and a periodic image) are closer than ``MIN_DISTANCE`` Å.

    Used by ``convert`` (an invalid record) and the ASE calculator (a refused structure), on their neighbor lists.
    """
    pair = closest_pair(np.asarray(positions, np.float64), np.asarray(cell, np.float64).reshape(3, 3),
                        edge_index, unit_shifts)
    if pair is not None and pair[2] < MIN_DISTANCE:
        raise ValueError(f"atoms {pair[0]} and {pair[1]} (or a periodic image) are {pair[2]:.4f} Å apart, closer "
                         f"than {MIN_DISTANCE} Å")


def _vesin_pairs(positions, cell, pbc, r_max):
    """(send, recv, unit shifts) of one group of atoms from vesin, self pairs in the home image removed."""
    _check_cell_list(positions, cell, pbc, r_max)
    nl = vesin.NeighborList(cutoff=r_max, full_list=True)
    send, recv, unit = nl.compute(positions, cell if pbc.any() else np.zeros((3, 3)), pbc.tolist(), "ijS")
    send, recv, unit = send.astype(np.int64), recv.astype(np.int64), unit.astype(np.float64).reshape(-1, 3)
    keep = ~((send == recv) & ~unit.any(axis=1))
    return send[keep], recv[keep], unit[keep]


def _free_axes(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """(k,3) orthonormal directions perpendicular to every periodic lattice vector (k = 3 - number periodic)."""
    if not pbc.any():
        return np.eye(3)
    _, _, vt = np.linalg.svd(cell[pbc])
    return vt[int(pbc.sum()):]


def _separated_groups(positions, cell, pbc, r_max) -> list[np.ndarray]:
    """Atom indices split where consecutive projections on a non-periodic axis differ by >= r_max.

    Periodic images move only along periodic lattice vectors, perpendicular to these axes, so atoms of two
    groups (and all their images) are at least r_max apart and have no pairs.
    """
    labels = np.zeros((len(positions), 0), np.int64)
    for axis in _free_axes(cell, pbc):
        p = positions @ axis
        order = np.argsort(p, kind="stable")
        gid = np.empty(len(p), np.int64)
        gid[order] = np.concatenate([[0], np.cumsum(np.diff(p[order]) >= r_max)])
        labels = np.column_stack([labels, gid])
    if labels.shape[1] == 0 or not labels.any():
        return [np.arange(len(positions))]
    _, inverse = np.unique(labels, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]


def _check_cell_list(positions, cell, pbc, r_max) -> None:
    """Raise ``ValueError`` where vesin's rescaling of its bins (capped at 1e5) would leave a direction with none.

    Bins per direction: face distance / r_max (periodic) or extent of the atoms / r_max (non-periodic), at least
    1; vesin scales them down keeping their ratios when the product exceeds the cap.
    """
    n = np.ones(3)
    if pbc.any():
        volume = abs(np.linalg.det(cell))
        for i in np.flatnonzero(pbc):
            j, k = [d for d in range(3) if d != i]
            area = np.linalg.norm(np.cross(cell[j], cell[k]))
            n[i] = max(1.0, np.trunc(volume / area / r_max)) if area > 0 and volume > 0 else 1.0
    extent = np.ptp(positions, axis=0)
    n[~pbc] = np.maximum(1.0, np.trunc(extent[~pbc] / r_max))
    if np.prod(n) > _VESIN_MAX_CELLS:  # vesin's rescaling (cpu_cell_list.cpp), in the same floating-point steps
        ratio_xy, ratio_yz = n[0] / n[1], n[1] / n[2]
        z = np.trunc(np.cbrt(_VESIN_MAX_CELLS / (ratio_xy * ratio_yz * ratio_yz)))
        y = np.trunc(ratio_yz * z)
        scaled = np.array([np.trunc(ratio_xy * y), y, z])
    else:
        scaled = n
    if scaled.min() < 1:
        raise ValueError(f"cell too elongated for the neighbor list: {n.astype(int).tolist()} cutoff-sized bins "
                         f"along its three directions (cell {np.round(cell, 3).tolist()} Å, cutoff {r_max} Å); "
                         f"use a less elongated cell or turn pbc off along the long direction")


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
    if with_labels:
        labels = read_labels(atoms, key_map)
    else:
        labels = {keys.TOTAL_CHARGE: read_labels(atoms, {})[keys.TOTAL_CHARGE]}
    return build_graph(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, r_max, labels,
                       head=head, dataset_index=dataset_index, dtype=dtype)
