"""``FoundationCalculator``: an ASE calculator for any ``foundation`` model (MD, relaxations, phonons, screening).

Graphs are built exactly as everywhere else (``foundation.data.from_atoms`` for the structure, the neighbor list of
``foundation.data.graph.neighbor_list`` at the model's ``config.r_max``). Across MD steps the neighbor list is
built once at ``r_max + skin`` and filtered to ``|r| < r_max`` on every call; it is rebuilt when an atom has
moved more than ``skin / 2`` since the last build or the cell, pbc or atoms changed. The filtered list is the
list a fresh build would give (same pairs, same order), so results equal rebuilding every step.
"""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch, Data

from . import keys
from .data.graph import from_atoms, neighbor_list

_DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
           torch.float64: torch.float64}


class SkinNeighborList:
    """Neighbor list at ``r_max`` (Å) served from a cached list at ``r_max + skin`` (Å), rebuilt only when needed."""

    def __init__(self, r_max: float, skin: float = 0.5):
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.r_max, self.skin = float(r_max), float(skin)
        self.builds = 0
        self._ref = None  # (positions, cell, pbc, numbers) at the last build

    def _stale(self, positions, cell, pbc, numbers) -> bool:
        if self._ref is None:
            return True
        p0, c0, b0, n0 = self._ref
        if len(n0) != len(numbers) or not (np.array_equal(n0, numbers) and np.array_equal(b0, pbc)
                                           and np.array_equal(c0, cell)):
            return True
        return len(positions) > 0 and float(np.max(np.sum((positions - p0) ** 2, axis=1))) > (self.skin / 2) ** 2

    def __call__(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """edge_index (2,E) int64 and unit_shifts (E,3) float64 of all pairs with |r| < r_max, as neighbor_list."""
        positions = np.asarray(positions, np.float64)
        cell = np.asarray(cell, np.float64).reshape(3, 3)
        pbc = np.asarray(pbc, bool).reshape(3)
        if self._stale(positions, cell, pbc, numbers):
            self._edges, self._unit = neighbor_list(positions, cell, pbc, self.r_max + self.skin)
            self._ref = (positions.copy(), cell.copy(), pbc.copy(), np.array(numbers).copy())
            self.builds += 1
        send, recv = self._edges
        vec = positions[recv] - positions[send] + self._unit @ cell
        keep = np.einsum("ij,ij->i", vec, vec) < self.r_max ** 2
        return self._edges[:, keep], self._unit[keep]


class FoundationCalculator(Calculator):
    """ASE calculator: energy, free_energy (eV), forces (eV/Å), stress (eV/Å³, Voigt, fully periodic cells),
    energies (per atom, eV), and charges (e) / dipole (e·Å) when the model outputs them.

    ``model``: a module with ``config.r_max``/``config.elements``/``config.heads`` called as
    ``model(batch, compute_forces=True, compute_stress=...)``; it is moved (in place) to ``device`` and ``dtype`` and put
    in eval mode. ``head``: readout head name (default: the first). ``skin`` (Å): neighbor-list skin for MD.
    The total charge (e) is read from ``atoms.info["charge"]`` (or ``"total_charge"``), default 0.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies", "charges", "dipole"]

    def __init__(self, model: torch.nn.Module, head: str | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float64", skin: float = 0.5, compute_stress: bool | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype, self.device = _DTYPES[dtype], torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        config = model.config
        self.r_max = float(config.r_max)
        self.elements = list(getattr(config, "elements", []) or [])
        self.heads = list(getattr(config, "heads", None) or ["default"])
        if head is None:
            head = self.heads[0]
        if head not in self.heads:
            raise ValueError(f"head {head!r} is not a head of this model; choose one of {self.heads}")
        self.head, self.head_index = head, self.heads.index(head)
        self.compute_stress = compute_stress
        self.neighbors = SkinNeighborList(self.r_max, skin)

    @classmethod
    def from_pretrained(cls, id_or_dir: str, head: str | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float64", revision: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, token: str | None = None, skin: float = 0.5,
                        model_class: type | None = None, **kwargs) -> "FoundationCalculator":
        """Load a model (Hub repo id or saved directory, see ``FoundationModel.from_pretrained``) and wrap it."""
        if model_class is None:
            from .model import FoundationModel as model_class
        model = model_class.from_pretrained(id_or_dir, revision=revision, cache_dir=cache_dir,
                                            local_files_only=local_files_only, token=token)
        return cls(model, head=head, device=device, dtype=dtype, skin=skin, **kwargs)

    # --- graphs -----------------------------------------------------------------------------------------
    def _check_elements(self, atoms: Atoms) -> None:
        if self.elements:
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.elements))
            if unknown:
                raise ValueError(f"structure {atoms.get_chemical_formula()} contains {unknown}, which this model "
                                 f"does not know (elements: {self.elements})")

    def graph(self, atoms: Atoms, reuse_neighbors: bool = True) -> Data:
        """The model input for ``atoms`` (``from_atoms`` + neighbor list at r_max, via the skin cache if asked)."""
        self._check_elements(atoms)
        data = from_atoms(atoms, None, with_labels=False, head=self.head_index, dtype=self.dtype)
        if reuse_neighbors:
            edge_index, unit = self.neighbors(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
        else:
            edge_index, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, self.r_max)
        data[keys.EDGE_INDEX] = torch.from_numpy(edge_index)
        data[keys.SHIFTS] = torch.from_numpy(unit @ atoms.cell.array).to(self.dtype)
        return data

    def _forward(self, graphs: list[Data], stress: bool) -> dict[str, torch.Tensor]:
        batch = Batch.from_data_list(graphs).to(self.device)
        out = self.model(batch, compute_forces=True, compute_stress=stress)
        return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _wants_stress(self, atoms: Atoms) -> bool:
        periodic = bool(np.all(atoms.pbc)) and atoms.cell.volume > 1e-12
        return periodic if self.compute_stress is None else (self.compute_stress and periodic)

    @staticmethod
    def _split(out: dict[str, torch.Tensor], sizes: list[int], stress: bool) -> list[dict]:
        """Per-structure ASE results (float64 numpy) from a batched model output."""
        results = [dict() for _ in sizes]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for key, value in out.items():
            arr = value.cpu().double().numpy()
            for i, res in enumerate(results):
                if key in (keys.FORCES, keys.NODE_ENERGY, keys.CHARGES):
                    res[{keys.NODE_ENERGY: "energies"}.get(key, key)] = arr[bounds[i]:bounds[i + 1]]
                elif key == keys.ENERGY:
                    res["energy"] = res["free_energy"] = float(arr[i])
                elif key == keys.STRESS and stress:
                    res["stress"] = full_3x3_to_voigt_6_stress(arr[i])
                elif key == keys.DIPOLE:
                    res["dipole"] = arr[i].reshape(3)
        return results

    # --- ASE interface --------------------------------------------------------------------------------
    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        stress = self._wants_stress(self.atoms)
        out = self._forward([self.graph(self.atoms)], stress)
        self.results = self._split(out, [len(self.atoms)], stress)[0]

    def calculate_many(self, structures: list[Atoms], max_atoms: int = 4096) -> list[dict]:
        """Results for many structures, batched up to ``max_atoms`` atoms per forward pass.

        Returns one dict per structure (same keys and units as ``calc.results``; stress only for fully periodic
        cells), in input order. Neighbor lists are built fresh (no skin) for each structure.
        """
        results: list[dict | None] = [None] * len(structures)
        for periodic in (True, False):  # stress needs a cell: never mix periodic and non-periodic in a batch
            idx = [i for i, a in enumerate(structures) if self._wants_stress(a) == periodic]
            start = 0
            while start < len(idx):
                stop, n = start, 0
                while stop < len(idx) and (stop == start or n + len(structures[idx[stop]]) <= max_atoms):
                    n += len(structures[idx[stop]])
                    stop += 1
                chunk = idx[start:stop]
                graphs = [self.graph(structures[i], reuse_neighbors=False) for i in chunk]
                out = self._forward(graphs, periodic)
                for i, res in zip(chunk, self._split(out, [len(structures[i]) for i in chunk], periodic)):
                    results[i] = res
                start = stop
        return results  # type: ignore[return-value]
