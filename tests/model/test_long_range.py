"""FoundationModel with the long-range charge head: conformance, charges, total charge, HVP, config round trip."""
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from model_factory import tiny_model
from torch_geometric.data import Batch

from foundation import ModelConfig, keys, testing
from foundation.data.graph import from_atoms

LR = {"kind": "latent_ewald", "sigma": 1.0, "hidden": 8}


@pytest.mark.parametrize("max_L", [0, 1])
def test_conformance_with_long_range(max_L, ethanol, small_cell, crystal):
    model = tiny_model(max_L=max_L, long_range=LR)
    report = testing.check_all(model, ethanol, small_cell)
    assert report["crystal_stress_fd"] < 1e-6 and report["molecule_forces_fd"] < 1e-6
    testing.check_stress_fd(model, crystal)
    testing.check_lattice_choice(model, crystal)


def test_long_range_changes_energy_and_reports_charges(ethanol, crystal):
    plain, charged = tiny_model(seed=4), tiny_model(seed=4, long_range=LR)
    batch = Batch.from_data_list([from_atoms(ethanol, 4.0), from_atoms(crystal, 4.0)])
    out_plain, out = plain(batch, compute_stress=True), charged(batch, compute_stress=True)
    assert keys.CHARGES in out and keys.DIPOLE in out and keys.CHARGES not in out_plain
    assert out[keys.CHARGES].shape == (len(ethanol) + len(crystal),) and out[keys.DIPOLE].shape == (2, 3)
    assert (out[keys.ENERGY] - out_plain[keys.ENERGY]).abs().max() > 1e-4  # the head contributes
    # per-atom energies still sum to the total, charges are neutral per structure by default
    sums = torch.zeros(2, dtype=out[keys.ENERGY].dtype).index_add(0, batch.batch, out[keys.NODE_ENERGY])
    torch.testing.assert_close(sums, out[keys.ENERGY])
    q = torch.zeros(2, dtype=out[keys.CHARGES].dtype).index_add(0, batch.batch, out[keys.CHARGES])
    torch.testing.assert_close(q, torch.zeros(2, dtype=q.dtype), atol=1e-12, rtol=0)
    dipole = (out[keys.CHARGES][: len(ethanol), None] * batch.pos[: len(ethanol)]).sum(0)
    torch.testing.assert_close(out[keys.DIPOLE][0], dipole)


def test_total_charge_from_the_batch_is_exact(ethanol):
    model = tiny_model(long_range=LR)
    graphs = []
    for q in (-1.0, 0.0, 2.0):
        atoms = ethanol.copy()
        atoms.info["charge"] = q
        graphs.append(from_atoms(atoms, 4.0))
    batch = Batch.from_data_list(graphs)
    out = model(batch)
    per = torch.zeros(3, dtype=out[keys.CHARGES].dtype).index_add(0, batch.batch, out[keys.CHARGES])
    torch.testing.assert_close(per, torch.tensor([-1.0, 0.0, 2.0], dtype=per.dtype), atol=1e-12, rtol=0)
    assert len({round(float(e), 8) for e in out[keys.ENERGY]}) == 3  # charge changes the energy


def test_hessian_vector_product_includes_long_range(ethanol):
    model = tiny_model(long_range=LR)
    data = from_atoms(ethanol, 4.0)
    v = torch.randn(len(ethanol), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = model.hessian_vector_product(Batch.from_data_list([data]), v)
    h = 1e-4
    forces = []
    for sign in (1, -1):
        shifted = data.clone()
        shifted.pos = data.pos + sign * h * v
        forces.append(model(Batch.from_data_list([shifted]))[keys.FORCES])
    fd = -(forces[0] - forces[1]) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-7)


def test_config_round_trip_fills_long_range_defaults():
    config = ModelConfig(elements=["H", "O"], long_range={"kind": "coulomb"})
    again = ModelConfig.from_json(config.to_json())
    assert again.long_range == config.long_range and again.long_range["sigma"] == 1.0
    with pytest.raises(ValueError, match="sigmma"):
        ModelConfig(elements=["H"], long_range={"sigmma": 1.0})


def test_coulomb_kind_refuses_periodic_cells(small_cell):
    model = tiny_model(long_range={"kind": "coulomb"})
    with pytest.raises(ValueError):
        model(Batch.from_data_list([from_atoms(small_cell, 4.0)]))


def test_charge_excess_loss_gives_each_far_apart_molecule_its_own_charge():
    """Trained on isolated H2O (Q=0) and OH- (Q=-1) with the label-free charge_excess term only, a pair of them
    beyond the cutoff (total -1) carries ~0 on the water and ~-1 on the hydroxide; the uniform correction alone
    (an untrained head) spreads the charge over both."""
    from foundation.train.config import LossConfig
    from foundation.train.loss import Loss
    water, hydroxide = molecule("H2O"), Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    hydroxide.info["charge"] = -1
    pair = water + Atoms(hydroxide.symbols, hydroxide.positions + [9.0, 0.0, 0.0])
    pair.info["charge"] = -1
    model = tiny_model(seed=1, long_range={"kind": "coulomb", "hidden": 8})
    graphs = [from_atoms(a, 4.0) for a in (water, hydroxide, pair)]   # total charge from info["charge"]
    batch, probe = Batch.from_data_list(graphs[:2]), Batch.from_data_list(graphs[2:])

    def water_charge():
        return float(model(probe, compute_forces=False)[keys.CHARGES][:3].sum())
    before = water_charge()
    loss = Loss(LossConfig(coefficients={"charge_excess": 1.0}), 200)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        pred = model(batch, compute_forces=False, training=True)
        Loss.combine(loss.sums(pred, batch), loss.counts(batch), loss.coefficients(0)).backward()
        optimizer.step()
    excess = model(batch, compute_forces=False)[keys.CHARGE_EXCESS]
    assert excess.abs().max() < 0.01
    after = water_charge()
    assert abs(before) > 0.1 and abs(after) < 0.02
