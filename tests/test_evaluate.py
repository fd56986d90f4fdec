"""evaluate(): the same metrics from an LMDB dataset and from the extxyz it was converted from, equal to a direct
computation; JSON and parity plot written; clear error for a missing path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.io import read
from pair_model import PairPotential

from foundation.data import from_atoms
from foundation.evaluate import evaluate


def test_lmdb_and_extxyz_give_the_same_correct_metrics(tmp_path, emt_data):
    torch.manual_seed(0)
    model = PairPotential([28, 29], r_max=4.0).double()
    model.set_statistics(atomic_energies={"Cu": -0.1, "Ni": 0.2})
    xyz = emt_data["valid"].parent / "valid.xyz"
    from_dir = evaluate(model, emt_data["valid"], max_atoms=40, dtype=torch.float64,
                        json_path=tmp_path / "m.json", plot=tmp_path / "p.png")
    from_file = evaluate(model, xyz, max_atoms=40, dtype=torch.float64)
    frames = read(xyz, ":")
    e_err, f_err, s_err = [], [], []
    for atoms in frames:
        g = from_atoms(atoms, r_max=4.0, dtype=torch.float64)
        out = model(g, compute_stress=True, training=False)
        e_err.append((float(out["energy"][0]) - atoms.get_potential_energy()) / len(atoms))
        f_err.append((out["forces"].detach().numpy() - atoms.get_forces()).ravel())
        s_err.append((out["stress"].detach().numpy()[0] - g["stress"].numpy()[0]).ravel())
    f_err, s_err = np.concatenate(f_err), np.concatenate(s_err)
    for res in (from_dir, from_file):
        assert res["all/energy_per_atom"]["mae"] == pytest.approx(np.mean(np.abs(e_err)), rel=1e-9)
        assert res["all/forces"]["rmse"] == pytest.approx(np.sqrt(np.mean(f_err ** 2)), rel=1e-9)
        assert res["all/stress"]["mae"] == pytest.approx(np.mean(np.abs(s_err)), rel=1e-9)
        assert res["all/forces"]["count"] == f_err.size
    assert json.loads((tmp_path / "m.json").read_text())["all/forces"]["count"] == f_err.size
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate(PairPotential([29]), tmp_path / "nope")
