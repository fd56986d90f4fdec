"""Shared structures for the model tests (the tiny-model factory is ``model_factory``)."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule


@pytest.fixture
def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.fixture
def small_cell() -> Atoms:
    """Cu/O fcc primitive cell x (2,1,1): lattice vectors (2.5 Å) shorter than r_max, atoms see their images."""
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.numbers[1] = 8
    atoms.rattle(0.05, seed=2)
    return atoms


@pytest.fixture
def crystal() -> Atoms:
    """A triclinic 6-atom cell with three elements."""
    atoms = Atoms("CuCuOCHCu", scaled_positions=np.random.default_rng(3).random((6, 3)),
                  cell=[[4.1, 0.2, 0.1], [0.5, 3.9, -0.3], [0.2, 0.4, 4.3]], pbc=True)
    atoms.positions += 0.0
    return _spread(atoms, 1.0)


def _spread(atoms: Atoms, min_dist: float) -> Atoms:
    """Move atoms until all pairs (with images) are at least ``min_dist`` apart (deterministic)."""
    rng = np.random.default_rng(0)
    for _ in range(1000):
        d = atoms.get_all_distances(mic=True) + np.eye(len(atoms)) * 10
        if d.min() >= min_dist:
            return atoms
        i = int(np.argmin(d.min(axis=1)))
        atoms.positions[i] += rng.normal(size=3) * 0.3
    return atoms
