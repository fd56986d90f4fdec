"""Small EMT datasets converted to LMDB shards, for the ``emt_data`` fixture and tests that need one more."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_emt_dataset(out: Path, n: int, seed: int, stress: bool = True, sizes=(1, 2)) -> Path:
    """``n`` rattled Cu/Ni fcc cells (4-16 atoms) labelled by ASE's EMT, converted to shards at ``out``.

    With ``stress=False`` the structures carry no stress label (mixed with others to test masking)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from foundation.data.convert import convert
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        reps = tuple(int(rng.choice(sizes)) for _ in range(3))
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(reps) if i % 3 else bulk("Cu", "fcc", a=3.6).repeat(reps)
        atoms.numbers[rng.random(len(atoms)) < 0.3] = 28
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        atoms.positions += 0.08 * rng.standard_normal(atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if stress:
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    out.parent.mkdir(parents=True, exist_ok=True)
    xyz = out.parent / f"{out.name}.xyz"
    write(xyz, frames, format="extxyz")
    return convert([xyz], out, shard_size=max(4, n // 2), r_max=4.0, progress=False)
