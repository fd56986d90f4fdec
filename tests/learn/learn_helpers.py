"""Helpers of the learn tests (imported as ``learn_helpers``; also by ``module:Name`` in recipes of the tests):
tiny Cu/Au models, EMT-labelled frames, a recipe dict, and labellers that fail on purpose or log their calls."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from ase.calculators.emt import EMT

from foundation.model import FoundationModel, ModelConfig

TINY = dict(num_channels=8, max_L=0, max_ell=1, num_layers=2, correlation=2, num_bessel=4, r_max=4.0,
            radial_mlp=[8], readout_mlp=4, avg_num_neighbors=12.0)


def tiny_model(seed: int, elements=("Cu", "Au"), dtype: str = "float64") -> FoundationModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("small", elements=list(elements), atomic_energies=[-0.1, -0.2], scale=0.5,
                             dtype=dtype, **TINY)
    return FoundationModel(cfg)


def cuau(seed: int = 0, repeat=(2, 1, 1), rattle: float = 0.1):
    """A rattled 8-atom Cu-Au cell."""
    from ase.build import bulk
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat(repeat)
    atoms.numbers = rng.choice([29, 79], len(atoms))
    atoms.positions += rattle * rng.standard_normal(atoms.positions.shape)
    return atoms


def _digest(atoms) -> str:
    return hashlib.sha256(np.ascontiguousarray(atoms.positions, "<f8").tobytes()).hexdigest()[:16]


class LoggedEMT(EMT):
    """EMT that appends the digest of every structure it computes to ``$LEARN_TEST_LOG`` (if set)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
        path = os.environ.get("LEARN_TEST_LOG")
        if path:
            with Path(path).open("a") as fh:
                fh.write(_digest(self.atoms) + "\n")


class FlakyEMT(EMT):
    """EMT that raises for structures whose first atom sits at x < ``raise_below`` Å and gives NaN forces for
    x > ``nan_above`` Å (a labeller that fails on some frames)."""

    def __init__(self, raise_below: float = -1e9, nan_above: float = 1e9, **kwargs):
        super().__init__(**kwargs)
        self.raise_below, self.nan_above = raise_below, nan_above

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
        x = float(self.atoms.positions[0, 0])
        if x < self.raise_below:
            raise RuntimeError(f"SCF did not converge (x = {x:.3f})")
        if x > self.nan_above:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def recipe(root: Path, **sections) -> dict:
    """A tiny learn recipe in ``root``: a 300-step-free base built from EMT, K = 2, 1 iteration."""
    values = {
        "out_dir": str(root / "run"), "seed": 0, "max_steps": 4, "log_every": 2, "valid_every": 100,
        "checkpoint_every": 100, "progress": False, "data": {"valid_fraction": 0.0, "max_atoms": 32},
        "optim": {"lr": 0.01}, "ema": {"enabled": False}, "engine": {"precision": "fp32"},
        "base": {"build": {"structures": [{"bulk": "Cu", "a": 3.61, "cubic": True},
                                          {"bulk": "Au", "a": 4.08, "cubic": True}],
                           "overrides": {**{k: v for k, v in TINY.items() if k != "avg_num_neighbors"},
                                         "dtype": "float32"},
                           "rattle_copies": 1, "md_steps": 0, "max_steps": 4}},
        "structures": [{"bulk": "Cu", "a": 3.75, "cubic": True, "substitute": {"Au": 0.5}}],
        "labeller": {"calculator": "ase.calculators.emt:EMT"},
        "committee": {"size": 2}, "init": {"rattle_copies": 1},
        "explore": {"temperatures": [600.0], "steps": 20, "interval": 5, "timestep": 2.0},
        "select": {"trust_lo": 0.0, "trust_hi": 1e9, "max_per_iteration": 2},
        "stop": {"accurate_fraction": 1.0, "max_iterations": 1},
        "test": {"md_frames": 4, "temperatures": [300.0], "md_interval": 5},
    }
    values.update(sections)
    return values
