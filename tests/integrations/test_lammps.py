"""FoundationMLIAP on a stand-in for LAMMPS' ML-IAP data object: owned and ghost atoms built from real periodic
cells as LAMMPS lays them out, forces folded back onto owners, energy, forces and virial against the calculator."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from foundation.calculator import FoundationCalculator
from foundation.integrations.artifact import build_artifact
from foundation.integrations.lammps import FoundationMLIAP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_artifact import make_model  # noqa: E402


class StandInData:
    """The fields LAMMPS' MLIAPDataPy gives a unified model (mliap_unified_couple.pyx), plus what LAMMPS does with
    the results: ``update_pair_forces`` adds fij to f[i], subtracts it from f[j] and tallies the virial."""

    def __init__(self, elems, nlocal, pair_i, pair_j, rij, ghost_neighbours: bool):
        self.nlocal, self.ntotal = nlocal, len(elems)
        self.nlistatoms = self.ntotal if ghost_neighbours else nlocal
        self.elems = np.asarray(elems, dtype=np.int32)
        self.npairs = len(pair_i)
        self.pair_i, self.pair_j = np.asarray(pair_i, np.int32), np.asarray(pair_j, np.int32)
        self.jatoms = self.pair_j
        self.rij = np.ascontiguousarray(rij, dtype=np.float64)
        self.f = np.zeros((self.ntotal, 3))
        self.virial = np.zeros((3, 3))
        self._eatoms, self.energy = None, None

    @property
    def eatoms(self):
        return self._eatoms

    @eatoms.setter
    def eatoms(self, value):
        assert value.shape == (self.nlistatoms,) and value.dtype == np.float64
        self._eatoms = value

    def update_pair_forces(self, fij):
        assert fij.shape == (self.npairs, 3) and fij.dtype == np.float64 and fij.flags["C_CONTIGUOUS"]
        np.add.at(self.f, self.pair_i, fij)
        np.add.at(self.f, self.pair_j, -fij)
        self.virial -= np.einsum("pa,pb->ab", self.rij, fij)


def lammps_layout(atoms, cutoff_ghost: float, r_max: float, element_types: list[str], ghost_neighbours: bool):
    """Owned atoms = ``atoms`` wrapped into the cell; ghosts = the periodic images within ``cutoff_ghost`` of the cell
    (LAMMPS' triclinic rule: fractional coordinate within cutoff / plane spacing outside [0, 1)); pairs closer than
    r_max, grouped by centre atom, for owned atoms (and for ghosts with ``ghost_neighbours``).
    Returns (StandInData, owner of every atom (ntotal,))."""
    cell = atoms.cell.array
    frac = atoms.get_scaled_positions(wrap=True)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)  # distance between lattice planes
    margin = cutoff_ghost / spacing
    reach = np.ceil(margin).astype(int)
    positions, owner = [frac @ cell], [np.arange(len(atoms))]
    for shift in itertools.product(*[range(-r, r + 1) for r in reach]):
        if not any(shift):
            continue
        image = frac + np.array(shift)
        keep = np.all((image >= -margin) & (image < 1 + margin), axis=1)
        positions.append(image[keep] @ cell)
        owner.append(np.nonzero(keep)[0])
    x, owner = np.concatenate(positions), np.concatenate(owner)
    symbols = atoms.get_chemical_symbols()
    elems = [element_types.index(symbols[o]) for o in owner]
    centres = len(x) if ghost_neighbours else len(atoms)
    vec = x[None, :, :] - x[:centres, None, :]
    dist = np.linalg.norm(vec, axis=-1)
    i, j = np.nonzero((dist < r_max) & (dist > 0))
    return StandInData(elems, len(atoms), i, j, vec[i, j], ghost_neighbours), owner


@pytest.fixture(scope="module")
def model_and_artifact():
    model = make_model(max_L=1)
    return model, build_artifact(model, head="wb97")


@pytest.mark.parametrize("cell", ["primitive", "triclinic"])
def test_energy_forces_virial_match_the_calculator(model_and_artifact, cell):
    model, artifact = model_and_artifact
    atoms = bulk("Si", "diamond", a=5.43) if cell == "primitive" else bulk("Cu", "fcc", a=3.7) * (2, 1, 1)
    if cell == "triclinic":
        atoms.symbols[1] = "Si"
        atoms.set_cell(atoms.cell.array + [[0.0, 0.2, 0.1], [0.1, 0.0, -0.2], [0.0, 0.3, 0.0]], scale_atoms=True)
    atoms.rattle(0.05, seed=3)
    unified = FoundationMLIAP(artifact)
    assert unified.rcutfac == 2.0 and unified.element_types == ["H", "C", "O", "Si", "Cu"]
    data, owner = lammps_layout(atoms, 2 * model.config.r_max + 0.5, model.config.r_max, unified.element_types, True)
    assert data.ntotal > 20 * data.nlocal  # a small cell: most atoms are ghosts, several images of each
    unified.compute_forces(data)
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owner, data.f)  # LAMMPS' reverse communication of ghost forces
    atoms.calc = FoundationCalculator(model, head="wb97")
    assert abs(data.energy - atoms.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(data.eatoms[data.nlocal:], 0.0)
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-10, rtol=0)
    virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
    np.testing.assert_allclose(data.virial, virial, atol=1e-9, rtol=0)


def test_missing_ghost_neighbours_and_long_range_are_refused(model_and_artifact, tmp_path):
    model, artifact = model_and_artifact
    atoms = bulk("Si", "diamond", a=5.43)
    unified = FoundationMLIAP(artifact)
    data, _ = lammps_layout(atoms, 2 * model.config.r_max + 0.5, model.config.r_max, unified.element_types, False)
    with pytest.raises(ValueError, match="ghost neighbours"):
        unified.compute_forces(data)
    from foundation.integrations.artifact import export_torchscript
    path = export_torchscript(make_model(long_range={"kind": "coulomb"}), tmp_path / "lr.pt")
    with pytest.raises(ValueError, match="short-range models only"):
        FoundationMLIAP(str(path))
    one_layer = make_model(num_layers=1)
    data, owner = lammps_layout(atoms, model.config.r_max + 0.5, 4.0, unified.element_types, False)
    FoundationMLIAP(build_artifact(one_layer)).compute_forces(data)  # one layer: owned atoms' pairs suffice
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owner, data.f)
    atoms.calc = FoundationCalculator(one_layer)
    assert abs(data.energy - atoms.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-10, rtol=0)
