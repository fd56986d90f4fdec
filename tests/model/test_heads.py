"""Statistics per head: set_statistics, isolated atoms get E0 exactly, scale and shift act on the interaction."""
import numpy as np
import pytest
from ase import Atoms
from model_factory import tiny_model

from foundation import testing


def test_set_statistics_updates_config_and_energies(ethanol):
    model = tiny_model(heads=["a", "b"], scale=1.0, shift=0.0)
    before = testing.model_outputs(model, [ethanol], heads=[1])[0]
    model.set_statistics(atomic_energies={"H": -1.0, "C": -2.0, "O": -3.0, "Cu": -4.0}, head="b")
    assert model.config.atomic_energies["b"] == [-1.0, -2.0, -3.0, -4.0]
    assert model.config.atomic_energies["a"] == [-13.6, -1030.0, -2040.0, -4.5]
    after = testing.model_outputs(model, [ethanol], heads=[1])[0]
    e0_diff = sum({"H": -1.0 + 13.6, "C": -2.0 + 1030.0, "O": -3.0 + 2040.0}[s] for s in ethanol.get_chemical_symbols())
    assert after["energy"] - before["energy"] == pytest.approx(e0_diff, abs=1e-8)
    assert np.allclose(after["forces"], before["forces"])
    testing.check_isolated_atoms(model)

    model.set_statistics(scale=3.0, head="b")
    scaled = testing.model_outputs(model, [ethanol], heads=[1])[0]
    e0 = -2 * 2.0 - 6 * 1.0 - 3.0
    assert scaled["energy"] - e0 == pytest.approx(3.0 * (after["energy"] - e0), rel=1e-10)
    assert np.allclose(scaled["forces"], 3.0 * after["forces"])
    with pytest.raises(ValueError, match="no value for elements"):
        model.set_statistics(atomic_energies={"H": 0.0})
    with pytest.raises(ValueError, match="unknown head 'c'"):
        model.set_statistics(scale=1.0, head="c")


def test_shift_acts_on_condensed_atoms_and_fades_when_isolated(small_cell):
    model = tiny_model(shift=0.0)
    base = testing.model_outputs(model, [small_cell])[0]
    model.set_statistics(shift=0.25, avg_num_neighbors=10.0)
    assert model.config.avg_num_neighbors == 10.0
    model.set_statistics(avg_num_neighbors=6.0)
    shifted = testing.model_outputs(model, [small_cell])[0]
    # atoms in a dense cell have many neighbours: tanh(coordination) ~ 1, so each atom gets ~ +0.25 eV
    assert np.allclose(shifted["energies"] - base["energies"], 0.25, atol=1e-3)
    dimer = [Atoms("Cu2", positions=[[0, 0, 0], [0, 0, d]]) for d in (3.99999, 4.00001)]
    a, b = testing.model_outputs(model, dimer)
    assert abs(a["energy"] - b["energy"]) < 1e-9  # the shift switches on smoothly at r_max
