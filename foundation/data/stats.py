"""Dataset statistics the model and trainer need, accumulated in one streaming pass (memory O(Z^2)).

- per-element reference energies E0 (eV) by least squares on (element counts -> total energy),
- mean neighbor count at r_max (edges per atom, full list, i.e. both directions counted),
- force RMS (eV/Å, root mean square over all force components),
- mean and standard deviation of the per-atom energy after subtracting the references (eV/atom).

The least-squares fit uses the normal equations accumulated record by record, so a 100-million-structure
corpus needs no second pass. With a rank-deficient composition matrix (e.g. every structure has the same
stoichiometry) the minimum-norm solution is returned and ``e0_rank`` < number of elements says so.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .. import keys
from .graph import neighbor_list

MAX_Z = 118


class StatsAccumulator:
    """Feed structures with ``update``; read the statistics with ``result()``."""

    def __init__(self, r_max: float | None = 5.0):
        self.r_max = r_max
        z = MAX_Z + 1
        self.ata = np.zeros((z, z))          # sum c c^T
        self.aty = np.zeros(z)               # sum c E
        self.yy = 0.0                        # sum E^2
        self.c_over_n = np.zeros(z)          # sum c / n
        self.e_over_n = 0.0                  # sum E / n
        self.cc_over_n2 = np.zeros((z, z))   # sum c c^T / n^2
        self.ce_over_n2 = np.zeros(z)        # sum c E / n^2
        self.ee_over_n2 = 0.0                # sum E^2 / n^2
        self.n_energy = 0
        self.f2 = 0.0
        self.n_force_components = 0
        self.edges = 0
        self.atoms_nl = 0
        self.structures = 0
        self.atoms = 0

    def update(self, numbers: np.ndarray, labels: Mapping[str, np.ndarray],
               edge_count: int | None = None) -> None:
        """Add one structure: numbers (n,) atomic numbers, labels (float64, ASE units), edges at r_max if known."""
        numbers = np.asarray(numbers, dtype=np.int64)
        n = len(numbers)
        self.structures += 1
        self.atoms += n
        if edge_count is not None:
            self.edges += int(edge_count)
            self.atoms_nl += n
        if keys.ENERGY in labels and n > 0:
            c = np.bincount(numbers, minlength=MAX_Z + 1).astype(np.float64)
            e = float(labels[keys.ENERGY])
            self.ata += np.outer(c, c)
            self.aty += c * e
            self.yy += e * e
            self.c_over_n += c / n
            self.e_over_n += e / n
            self.cc_over_n2 += np.outer(c, c) / n**2
            self.ce_over_n2 += c * e / n**2
            self.ee_over_n2 += e * e / n**2
            self.n_energy += 1
        if keys.FORCES in labels:
            f = np.asarray(labels[keys.FORCES], dtype=np.float64)
            self.f2 += float(np.sum(f * f))
            self.n_force_components += f.size

    def update_structure(self, numbers, positions, cell, pbc, labels) -> int:
        """``update`` after computing the neighbor list at r_max; returns the number of edges."""
        count = None
        if self.r_max is not None:
            edge_index, _ = neighbor_list(positions, cell, pbc, self.r_max)
            count = edge_index.shape[1]
        self.update(numbers, labels, count)
        return count or 0

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Add the sums of another accumulator (e.g. from a worker process)."""
        for name, value in vars(other).items():
            if name == "r_max":
                continue
            setattr(self, name, getattr(self, name) + value)
        return self

    def result(self) -> dict:
        """Statistics as JSON-ready values (element keys are chemical symbols)."""
        from ase.data import chemical_symbols
        out: dict = {"num_structures": self.structures, "num_atoms": self.atoms, "r_max": self.r_max}
        out["avg_num_neighbors"] = self.edges / self.atoms_nl if self.atoms_nl else None
        out["force_rms"] = float(np.sqrt(self.f2 / self.n_force_components)) if self.n_force_components else None
        if self.n_energy:
            present = np.flatnonzero(np.diag(self.ata) > 0)
            e0, rank, rmse = _solve(self.ata, self.aty, self.yy, present, self.n_energy)
            full = np.zeros(MAX_Z + 1)
            full[present] = e0
            mean = (self.e_over_n - self.c_over_n @ full) / self.n_energy
            sq = (self.ee_over_n2 - 2 * self.ce_over_n2 @ full + full @ self.cc_over_n2 @ full) / self.n_energy
            out["reference_energies"] = {chemical_symbols[z]: float(v) for z, v in zip(present, e0)}
            out["e0_rank"] = int(rank)
            out["e0_fit_rmse_per_structure"] = rmse
            out["energy_per_atom_mean"] = float(mean)
            out["energy_per_atom_std"] = float(np.sqrt(max(sq - mean * mean, 0.0)))
        else:
            out["reference_energies"] = None
        return out


def _solve(ata, aty, yy, present, n):
    """Least squares E0 from the normal equations restricted to present elements; (E0, rank, rmse eV)."""
    a = ata[np.ix_(present, present)]
    b = aty[present]
    # scale columns to unit diagonal for conditioning, then minimum-norm solve
    d = np.sqrt(np.diag(a))
    x, _, rank, _ = np.linalg.lstsq(a / np.outer(d, d), b / d, rcond=1e-12)
    e0 = x / d
    sse = yy - 2 * e0 @ b + e0 @ a @ e0
    return e0, rank, float(np.sqrt(max(sse, 0.0) / n))


def fit_reference_energies(numbers_list: Iterable[np.ndarray], energies: Iterable[float]) -> dict[int, float]:
    """Per-element reference energies {Z: E0 (eV)} by least squares on element counts -> total energy."""
    acc = StatsAccumulator(r_max=None)
    for numbers, energy in zip(numbers_list, energies):
        acc.update(numbers, {keys.ENERGY: np.float64(energy)})
    res = acc.result()["reference_energies"] or {}
    from ase.data import atomic_numbers
    return {atomic_numbers[s]: v for s, v in res.items()}


def statistics_from_manifest(manifest: Mapping) -> dict:
    """The training statistics of a converted dataset: {"e0s": {Z: eV}, "avg_num_neighbors", "r_max",
    "force_rms" (eV/Å), "energy_shift" (mean per-atom energy after references, eV), "energy_scale" (eV)}."""
    from ase.data import atomic_numbers
    s = manifest.get("statistics") or {}
    refs = s.get("reference_energies") or {}
    return {"e0s": {atomic_numbers[k]: float(v) for k, v in refs.items()},
            "avg_num_neighbors": s.get("avg_num_neighbors"), "r_max": s.get("r_max"),
            "force_rms": s.get("force_rms"), "energy_shift": s.get("energy_per_atom_mean"),
            "energy_scale": s.get("energy_per_atom_std")}
