"""Fixtures shared by every test package: small EMT datasets converted to LMDB shards (``emt_data``), one torch
thread per test (tiny tensors gain nothing from threads; on a busy 2-core machine OpenMP barriers cost a lot).
``tests/`` is put on ``sys.path`` so that helper modules such as ``pair_model`` import from any test package."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


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


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emt")
    return {"train": write_emt_dataset(root / "train", 40, seed=1),
            "train_nostress": write_emt_dataset(root / "train_nostress", 24, seed=3, stress=False),
            "valid": write_emt_dataset(root / "valid", 12, seed=2)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
