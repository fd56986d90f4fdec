"""Helpers for the data tests (imported as ``data_helpers``): EMT-labelled structures, the shipped data path."""
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def data_file(relative: str) -> Path:
    """A file of the repository's data/ folder (shipped with every checkout)."""
    path = REPO_DATA / relative
    assert path.is_file(), f"{path} is missing from the checkout"
    return path


def emt_frames(count: int, seed: int = 0) -> list:
    """Rattled, strained Cu/Al/Ni cells (1-16 atoms, skewed) with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        atoms = bulk(["Cu", "Al", "Ni"][i % 3], "fcc", a=3.6 + 0.3 * (i % 3 == 1), cubic=bool(i % 2))
        atoms = atoms.repeat((1 + (i % 2), 1, 1 + (i % 3 == 0)))
        swap = rng.random(len(atoms)) < 0.3
        atoms.numbers[swap] = rng.choice([13, 28, 29], swap.sum())
        strain = np.eye(3) + rng.normal(scale=0.03, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info["config"] = i
        frames.append(atoms)
    return frames
