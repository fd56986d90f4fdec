"""The total-charge embedding (ModelConfig.max_total_charge): neutral structures are unchanged, charged ones get
their own energies, and the physics checks still hold for charged structures and mixed batches."""
from __future__ import annotations

import pytest
import torch
from model_factory import tiny_model
from torch_geometric.data import Batch

from foundation import FoundationModel, ModelConfig, keys, testing
from foundation.data import from_atoms


def _charged(atoms, q):
    atoms = atoms.copy()
    atoms.info["charge"] = q
    return atoms


def _energy(model, atoms):
    return model(Batch.from_data_list([from_atoms(atoms, model.config.r_max)]))[keys.ENERGY]


def test_neutral_structures_are_unchanged_and_charge_states_differ(ethanol, crystal):
    charged = tiny_model(seed=4, max_total_charge=2)
    plain = tiny_model(seed=9)
    plain.load_state_dict({k: v for k, v in charged.state_dict().items() if not k.startswith("charge_embedding")})
    for atoms in (ethanol, crystal):
        torch.testing.assert_close(_energy(charged, atoms), _energy(plain, atoms), rtol=0, atol=1e-12)
    energies = [float(_energy(charged, _charged(ethanol, q))) for q in (-2, -1, 0, 1, 2)]
    assert len({round(e, 9) for e in energies}) == 5
    assert energies[2] == pytest.approx(float(_energy(plain, ethanol)), abs=1e-12)
    testing.check_isolated_atoms(charged)


def test_physics_holds_for_charged_structures_and_mixed_batches(ethanol, crystal):
    model = tiny_model(seed=5, max_total_charge=1)
    cation = _charged(ethanol, 1)
    testing.check_rotation(model, cation)
    testing.check_translation(model, cation)
    testing.check_permutation(model, cation)
    testing.check_forces_fd(model, cation)
    testing.check_stress_fd(model, _charged(crystal, -1))
    testing.check_batch_consistency(model, [cation, ethanol, _charged(crystal, -1), crystal])


def test_unsupported_charges_are_clear_errors(ethanol):
    model = tiny_model(max_total_charge=1)
    for q in (2, 0.5):
        with pytest.raises(ValueError, match="max_total_charge"):
            _energy(model, _charged(ethanol, q))
    with pytest.raises(ValueError, match="max_total_charge must be an integer"):
        ModelConfig(elements=["H"], max_total_charge=-1).validate()


def test_round_trip_keeps_the_embedding(tmp_path, ethanol):
    model = tiny_model(seed=6, max_total_charge=2)
    loaded = FoundationModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config.max_total_charge == 2
    cation = _charged(ethanol, 2)
    torch.testing.assert_close(_energy(loaded, cation), _energy(model, cation), rtol=0, atol=0)
    assert ModelConfig.from_dict({k: v for k, v in model.config.to_dict().items()
                                  if k != "max_total_charge"}).max_total_charge == 0   # older config.json files
