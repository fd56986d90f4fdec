"""Labellers by name: EMT and the PySCF calculator (when pyscf is installed) through the teacher loader."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from foundation.distill.teacher import load_teacher


def test_named_emt_is_ases_emt():
    from ase.build import bulk
    from ase.calculators.emt import EMT
    teacher = load_teacher({"calculator": "emt"})
    atoms = bulk("Cu", cubic=True)
    atoms.rattle(0.05, seed=1)
    got = teacher.label([atoms], stress=False)[0]
    ref = atoms.copy()
    ref.calc = EMT()
    assert got["energy"] == pytest.approx(ref.get_potential_energy())
    assert teacher.revision.startswith("ase ")


def test_unknown_name_says_what_is_known():
    with pytest.raises(ValueError, match="gfn2-xtb"):
        load_teacher({"calculator": "dft"})


def test_pyscf_forces_are_minus_the_energy_gradient():
    pytest.importorskip("pyscf")
    teacher = load_teacher({"calculator": "pyscf", "kwargs": {"xc": "hf", "basis": "sto-3g"}})
    atoms = Atoms("H2O", positions=[[0.0, 0.76, 0.59], [0.0, -0.76, 0.59], [0.0, 0.0, 0.0]])
    calc = teacher.calculator
    atoms.calc = calc
    forces = atoms.get_forces()
    h = 1e-4
    for i, j in ((0, 1), (2, 2)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, j] += h
        minus.positions[i, j] -= h
        plus.calc = minus.calc = calc
        fd = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
        assert forces[i, j] == pytest.approx(fd, abs=1e-4)
    periodic = atoms.copy()
    periodic.pbc, periodic.cell = True, np.eye(3) * 8
    with pytest.raises(ValueError, match="labels molecules"):
        periodic.calc = calc
        periodic.get_potential_energy()
