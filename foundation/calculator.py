"""``FoundationCalculator``: an ASE calculator for any ``foundation`` model (MD, relaxations, phonons, screening).

Graphs are built exactly as everywhere else (``foundation.data.from_atoms`` for the structure, the neighbor list of
``foundation.data.graph.neighbor_list`` at the model's ``config.r_max``). Across MD steps the neighbor list is
built once at ``r_max + skin`` and filtered to ``|r| < r_max`` on every call. When the cell changes (NPT, cell
relaxations) the cached pairs are carried along with the strain, as LAMMPS does: pair vectors are recomputed from the
current positions and cell, and the skin test allows for how much the deformation can shorten a vector. The list is
rebuilt when an atom has moved too far from where the deformation alone would have taken it (an atom wrapped back into
the cell through a face keeps the list), or when pbc or atoms changed. The filtered list is the list a fresh build
would give (same pairs, same order), so results equal rebuilding every step.

Stress is the strain derivative of the energy over the cell volume, (1/V) dE/dstrain, for every structure with at
least one periodic direction and a cell of nonzero volume: for a slab that is the volume of the whole cell, vacuum
included, as DFT codes report it, so ASE's cell filters with a mask relax the periodic directions. Structures without
a periodic direction have no stress (absent from the results; in a batched model call their stress is zero).
"""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import atomic_numbers
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch, Data

from . import keys
from .data.graph import check_min_distance, from_atoms, neighbor_list
from .model.inference import DTYPES, inference_copy, select_head  # noqa: F401  (re-exported)


class SkinNeighborList:
    """Neighbor list at ``r_max`` (Å) served from a cached list at ``r_max + skin`` (Å), rebuilt only when needed.

    The cached pairs (sender, receiver, unit shift) stay valid under a change of cell: with the deformation
    F = cell0^-1 cell (cell = cell0 F, rows = lattice vectors) a pair vector is r = r0 F + (d_recv - d_send), where
    d = pos - pos0 F is an atom's displacement beyond the affine one. Since |r0 F| >= s |r0| (s the smallest singular
    value of F), every pair now closer than r_max was in the cached list if max |d| <= (s (r_max + skin) - r_max) / 2
    (= skin / 2 when the cell is unchanged). An atom wrapped back into the cell (d = k cell + a small rest, k integer,
    as torch-sim does every step) keeps the list: the unit shifts of its pairs absorb k and the skin test applies to
    the rest. ``builds`` counts the neighbor-list builds.
    """

    def __init__(self, r_max: float, skin: float = 0.5):
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.r_max, self.skin = float(r_max), float(skin)
        self.builds = 0
        self._ref = None  # (positions, cell, pbc, numbers) at the last build

    def _reusable(self, positions, cell, pbc, numbers) -> np.ndarray | None:
        """None if the list must be rebuilt, else the lattice translations k (n,3) by which atoms were wrapped since
        the build (class docstring)."""
        if self._ref is None:
            return None
        p0, c0, b0, n0 = self._ref
        if len(n0) != len(numbers) or not (np.array_equal(n0, numbers) and np.array_equal(b0, pbc)):
            return None
        allowed, moved = self.skin / 2, positions - p0
        if pbc.any() and not np.array_equal(c0, cell):  # without periodic directions the cell plays no role
            if abs(np.linalg.det(c0)) < 1e-12:  # no deformation gradient from a flat cell
                return None
            deformation = np.linalg.solve(c0, cell)
            smallest = float(np.linalg.svd(deformation, compute_uv=False).min())
            allowed, moved = 0.5 * (smallest * (self.r_max + self.skin) - self.r_max), positions - p0 @ deformation
            if allowed < 0:
                return None
        jumps = np.zeros_like(moved)
        if pbc.any() and abs(np.linalg.det(cell)) > 1e-12:  # whole lattice vectors, periodic directions only
            jumps = np.rint(np.linalg.solve(cell.T, moved.T).T) * pbc
            moved = moved - jumps @ cell
        if len(positions) and float(np.max(np.sum(moved ** 2, axis=1))) > allowed ** 2:
            return None
        return jumps

    def __call__(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """edge_index (2,E) int64 and unit_shifts (E,3) float64 of all pairs with |r| < r_max, as neighbor_list."""
        positions = np.asarray(positions, np.float64)
        cell = np.asarray(cell, np.float64).reshape(3, 3)
        pbc = np.asarray(pbc, bool).reshape(3)
        jumps = self._reusable(positions, cell, pbc, numbers)
        if jumps is None:
            self._edges, self._unit = neighbor_list(positions, cell, pbc, self.r_max + self.skin)
            self._ref = (positions.copy(), cell.copy(), pbc.copy(), np.array(numbers).copy())
            self.builds += 1
        elif jumps.any():  # r = pos[recv] - pos[send] + S cell with pos = pos' + k cell: S -> S - k_recv + k_send
            send, recv = self._edges
            self._unit = self._unit - jumps[recv] + jumps[send]  # same vector for all images of a pair: order kept
            p0, c0, b0, n0 = self._ref
            self._ref = (p0 + jumps @ c0, c0, b0, n0)
        send, recv = self._edges
        vec = positions[recv] - positions[send] + self._unit @ cell
        keep = np.einsum("ij,ij->i", vec, vec) < self.r_max ** 2
        return self._edges[:, keep], self._unit[keep]


class FoundationCalculator(Calculator):
    """ASE calculator: energy, free_energy (eV), forces (eV/Å), stress (eV/Å³, Voigt; cells with a periodic
    direction, module docstring), energies (per atom, eV), and charges (e) / dipole (e·Å) when the model outputs them;
    on a committee (``foundation.learn.CommitteeModel``) the members' mean plus ``energy_uncertainty`` (eV),
    ``forces_uncertainty`` (n,) (eV/Å) and ``max_devi_f`` (eV/Å).

    ``model``: a module with ``config.r_max``/``config.elements``/``config.heads`` called as
    ``model(batch, compute_forces=True, compute_stress=...)``. The calculator works on its own copy of it, moved to
    ``device`` and cast to ``dtype`` in eval mode: the model passed in is never changed (its dtype, device and mode
    stay as they were, and later changes to it do not reach the calculator). ``head``: readout head name (default:
    the first). ``skin`` (Å): neighbor-list skin for MD. ``compute_stress``: None (default) computes stress whenever
    it is defined, False never, True only where it is defined. The total charge (e) is read from
    ``atoms.info["charge"]`` (or ``"total_charge"``), default 0. ``implemented_properties`` lists what this model
    gives (charges and dipole only with a charge head), found by one call on an isolated atom. ``compile=True``
    evaluates ``head`` through ``foundation.integrations.compiled`` (torch.compile: the first call of each new
    composition compiles, then small-system MD runs faster; short-range models without charge embedding only).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies", "charges", "dipole"]

    def __init__(self, model: torch.nn.Module, head: str | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float64", skin: float = 0.5, compute_stress: bool | None = None,
                 compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.model = inference_copy(model, device, dtype)
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        config = self.model.config
        self.r_max = float(config.r_max)
        self.elements = list(getattr(config, "elements", []) or [])
        self.head, self.head_index = select_head(config, head)
        self.compute_stress = compute_stress
        self.neighbors = SkinNeighborList(self.r_max, skin)
        self.compiled = None
        self.implemented_properties = self._model_properties()
        if compile:
            from .integrations.compiled import compile_model
            self.compiled = compile_model(self.model, head=self.head, dtype=dtype, device=self.device)

    def _model_properties(self) -> list[str]:
        """The ASE properties this model gives, from its outputs on one isolated atom of its first element."""
        probe = Atoms(numbers=[atomic_numbers[self.elements[0]] if self.elements else 1])
        out = self._forward([self.graph(probe, reuse_neighbors=False)], stress=False)
        optional = [name for key, name in ((keys.NODE_ENERGY, "energies"), (keys.CHARGES, "charges"),
                                           (keys.DIPOLE, "dipole"), (keys.ENERGY_UNCERTAINTY,) * 2,
                                           (keys.FORCES_UNCERTAINTY,) * 2, (keys.MAX_DEVI_F,) * 2) if key in out]
        return ["energy", "free_energy", "forces", "stress", *optional]

    @classmethod
    def from_pretrained(cls, id_or_dir: str, head: str | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float64", revision: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, token: str | None = None, skin: float = 0.5,
                        model_class: type | None = None, **kwargs) -> FoundationCalculator:
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
        try:  # invalid cells and the minimum-distance rule of `foundation data convert` (0 Å gave NaN)
            if reuse_neighbors:
                edge_index, unit = self.neighbors(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
            else:
                edge_index, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, self.r_max)
            check_min_distance(atoms.positions, atoms.cell.array, edge_index, unit)
        except ValueError as exc:
            raise ValueError(f"structure {atoms.get_chemical_formula()}: {exc}; the model cannot evaluate it: fix "
                             f"the structure") from None
        data[keys.EDGE_INDEX] = torch.from_numpy(edge_index)
        data[keys.SHIFTS] = torch.from_numpy(unit @ atoms.cell.array).to(self.dtype)
        return data

    def _forward(self, graphs: list[Data], stress: bool) -> dict[str, torch.Tensor]:
        batch = Batch.from_data_list(graphs).to(self.device)
        model = self.model if self.compiled is None else self.compiled
        out = model(batch, compute_forces=True, compute_stress=stress)
        return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _wants_stress(self, atoms: Atoms) -> bool:
        return has_stress(atoms) and self.compute_stress is not False

    @staticmethod
    def _split(out: dict[str, torch.Tensor], sizes: list[int], stress: list[bool]) -> list[dict]:
        """Per-structure ASE results (float64 numpy) from a batched model output; stress where ``stress[i]``."""
        results = [dict() for _ in sizes]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for key, value in out.items():
            arr = value.cpu().double().numpy()
            for i, res in enumerate(results):
                if key in (keys.FORCES, keys.NODE_ENERGY, keys.CHARGES, keys.FORCES_UNCERTAINTY):
                    res[{keys.NODE_ENERGY: "energies"}.get(key, key)] = arr[bounds[i]:bounds[i + 1]]
                elif key == keys.ENERGY:
                    res["energy"] = res["free_energy"] = float(arr[i])
                elif key == keys.STRESS and stress[i]:
                    res["stress"] = full_3x3_to_voigt_6_stress(arr[i])
                elif key == keys.DIPOLE:
                    res["dipole"] = arr[i].reshape(3)
                elif key in (keys.ENERGY_UNCERTAINTY, keys.MAX_DEVI_F):   # a committee (foundation.learn)
                    res[key] = float(arr[i])
        return results

    # --- ASE interface --------------------------------------------------------------------------------
    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        stress = self._wants_stress(self.atoms)
        out = self._forward([self.graph(self.atoms)], stress)
        self.results = self._split(out, [len(self.atoms)], [stress])[0]
        if "stress" in properties and "stress" not in self.results:
            reason = ("compute_stress=False" if self.compute_stress is False else
                      f"pbc={self.atoms.pbc.tolist()}, cell volume {abs(self.atoms.cell.volume):.3g} Å³; stress "
                      "needs a periodic direction and a cell of nonzero volume (give a slab its full cell, vacuum "
                      "included)")
            raise PropertyNotImplementedError(f"no stress for {self.atoms.get_chemical_formula()}: {reason}")

    def calculate_many(self, structures: list[Atoms], max_atoms: int = 4096) -> list[dict]:
        """Results for many structures, batched up to ``max_atoms`` atoms per forward pass.

        Returns one dict per structure (same keys and units as ``calc.results``; stress only where it is defined,
        see ``has_stress``), in input order. Neighbor lists are built fresh (no skin) for each structure.
        """
        results: list[dict] = []
        start = 0
        while start < len(structures):
            stop, n = start, 0
            while stop < len(structures) and (stop == start or n + len(structures[stop]) <= max_atoms):
                n += len(structures[stop])
                stop += 1
            chunk = structures[start:stop]
            stress = [self._wants_stress(a) for a in chunk]
            out = self._forward([self.graph(a, reuse_neighbors=False) for a in chunk], any(stress))
            results += self._split(out, [len(a) for a in chunk], stress)
            start = stop
        return results


def has_stress(atoms: Atoms) -> bool:
    """Whether ``atoms`` has a stress: at least one periodic direction and a cell volume above 1e-8 Å³ (the model's
    rule, ``foundation.model.derivatives``). Slabs (pbc True, True, False with vacuum in the cell) have one."""
    return bool(np.any(atoms.pbc)) and abs(atoms.cell.volume) > 1e-8
