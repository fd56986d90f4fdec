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


def test_e0_sum_is_added_in_float64_whatever_the_model_dtype(ethanol):
    """A float32 model (also one cast from float64 with .float()) keeps E0 in float64 and adds the E0 sum in
    float64: with -31234.567891234 eV per C the float64 and float32 copies of the same weights agree to float32
    rounding of the residual (~1e-5 eV), not of the -1e5 eV total (float32 spacing there: 8 meV)."""
    import torch
    from torch_geometric.data import Batch

    from foundation import keys
    from foundation.data import from_atoms
    e0 = [-13.612345678, -31234.567891234, -40321.123456789, -4.5]
    model64 = tiny_model(atomic_energies=e0)
    model32 = tiny_model(atomic_energies=e0).float()
    assert model32.dtype == torch.float32 and model32.statistics.e0.dtype == torch.float64
    assert model32.statistics.e0[0].tolist() == e0                       # not rounded by .float()
    batch = Batch.from_data_list([from_atoms(ethanol, 4.0, dtype=torch.float64)])
    out64, out32 = model64(batch, compute_forces=False), model32(batch, compute_forces=False)
    assert out32[keys.ENERGY].dtype == torch.float64 and out32[keys.NODE_ENERGY].dtype == torch.float64
    total = float(out64[keys.ENERGY][0])
    assert total < -6e4
    residual = total - sum(e0[["H", "C", "O", "Cu"].index(s)] for s in ethanol.get_chemical_symbols())
    assert abs(float(out32[keys.ENERGY][0]) - total) < 1e-5 * max(1.0, abs(residual))
    assert abs(float(out32[keys.NODE_ENERGY].sum()) - total) < 1e-5 * max(1.0, abs(residual))
    assert abs(np.spacing(np.float32(total))) > 1e-3                      # the rounding this avoids
