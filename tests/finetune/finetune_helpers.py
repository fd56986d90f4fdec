"""Helpers of the fine-tuning tests (imported as ``finetune_helpers``): EMT frames and a recipe dict."""
from __future__ import annotations

from pathlib import Path

import numpy as np

R_MAX = 4.0


def emt_frames(n: int, seed: int, elements=(29, 28, 13)) -> list:
    """``n`` rattled, strained fcc cells (4-8 atoms) with random species from ``elements``, EMT labels."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((1, 1, 1 + i % 2))
        atoms.numbers = rng.choice(elements, len(atoms))
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
        atoms.calc = EMT()
        res = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **res)
        frames.append(atoms)
    return frames


def recipe(root: Path, out: str, **sections) -> dict:
    values = {"base": {"model": str(root / "base")}, "out_dir": str(root / out), "max_steps": 2, "log_every": 1,
              "valid_every": 100, "checkpoint_every": 100, "progress": False, "seed": 0,
              "data": {"train": [str(root / "new_train.xyz")], "valid": [str(root / "new_valid.xyz")],
                       "max_atoms": 32},
              "optim": {"lr": 0.01}, "ema": {"enabled": False}, "engine": {"zero_stage": 0}}
    for key, value in sections.items():
        values[key] = value
    return values
