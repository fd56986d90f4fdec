"""Closing E0 refit: least squares on the trained model's energy residuals, energies shift by per-element
constants, forces untouched; the trainer applies it to the EMA model it exports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from foundation import keys
from foundation.train.refit import refit_reference_energies


def tiny_model():
    from foundation import FoundationModel, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small", elements=["Ni", "Cu"], num_channels=8, max_L=0, r_max=4.0, num_layers=1,
                             max_ell=1, correlation=2, dtype="float64")
    model = FoundationModel(cfg)
    model.set_statistics(atomic_energies={"Ni": -0.4, "Cu": 0.7}, scale=0.5, shift=0.0, avg_num_neighbors=12.0)
    return model


def test_refit_is_the_least_squares_optimum_and_keeps_forces(emt_data):
    from foundation.data import ShardedDataset
    ds = ShardedDataset(emt_data["train"], r_max=4.0, dtype=torch.float64)
    model = tiny_model()
    batch = Batch.from_data_list([ds[i] for i in range(len(ds))])
    before = model(batch, compute_forces=True)
    summary = refit_reference_energies(model, {"default": [ds]}, max_structures=1000, max_atoms=64)["default"]
    after = model(batch, compute_forces=True)
    torch.testing.assert_close(after[keys.FORCES], before[keys.FORCES], rtol=0, atol=1e-12)
    counts = np.stack([np.bincount(d[keys.ATOMIC_NUMBERS].numpy(), minlength=30)[[28, 29]]
                       for d in batch.to_data_list()])
    res_before = (batch[keys.ENERGY] - before[keys.ENERGY]).numpy()
    res_after = (batch[keys.ENERGY] - after[keys.ENERGY]).numpy()
    n = counts.sum(axis=1)
    # least squares of per-atom residuals: they end orthogonal to every element's (count / N) column
    np.testing.assert_allclose((counts / n[:, None] ** 2).T @ res_after, 0.0,
                               atol=1e-8 * np.abs((counts / n[:, None] ** 2).T @ res_before).max())
    assert np.sum((res_after / n) ** 2) < 0.05 * np.sum((res_before / n) ** 2)   # the wrong E0 are undone
    delta = np.linalg.lstsq(counts / n[:, None], res_before / n, rcond=None)[0]
    np.testing.assert_allclose([summary["delta_e0"]["Ni"], summary["delta_e0"]["Cu"]], delta, rtol=1e-6)
    assert model.config.atomic_energies["default"] == pytest.approx([-0.4 + delta[0], 0.7 + delta[1]])
    assert summary["structures"] == len(ds) and abs(summary["mean_residual_per_atom_after"]) < 1e-9
    assert summary["rmse_per_atom_after"] < summary["rmse_per_atom_before"]


def test_refit_samples_at_most_max_structures(emt_data):
    from foundation.data import ShardedDataset
    ds = ShardedDataset(emt_data["train"], r_max=4.0, dtype=torch.float64)
    summary = refit_reference_energies(tiny_model(), {"default": [ds]}, max_structures=10, max_atoms=64)
    assert summary["default"]["structures"] == 10


@pytest.mark.slow
def test_trainer_refits_the_exported_model(tmp_path, emt_data):
    from foundation import FoundationModel
    from foundation.train.config import config_from_dict
    from foundation.train.loop import Trainer
    out = tmp_path / "run"
    cfg = config_from_dict({
        "out_dir": str(out), "max_steps": 3, "valid_every": 3, "checkpoint_every": 3, "progress": False,
        "data": {"train": [str(emt_data["train"])], "valid": [str(emt_data["valid"])], "max_atoms": 48},
        "model": {"overrides": {"num_channels": 8, "r_max": 4.0, "num_layers": 1, "max_ell": 1, "correlation": 2,
                                "max_L": 0}},
        "engine": {"zero_stage": 0}, "refit_e0": {"enabled": True, "max_structures": 100}})
    trainer = Trainer(cfg)
    fitted = list(trainer.engine.module.config.atomic_energies["default"])   # least squares of the labels
    metrics = trainer.fit()
    summary = json.loads((out / "refit_e0.json").read_text())["default"]
    exported = FoundationModel.from_pretrained(out / "model").config.atomic_energies["default"]
    delta = [summary["delta_e0"][s] for s in trainer.engine.module.config.elements]
    assert exported == pytest.approx([a + d for a, d in zip(fitted, delta)])
    assert max(abs(d) for d in delta) > 1e-6 and abs(summary["mean_residual_per_atom_after"]) < 1e-6
    assert metrics["all/energy_per_atom"]["mae"] > 0


def test_one_composition_shifts_every_structure_by_the_mean_per_atom_residual():
    """rMD17-like data (one stoichiometry): the elements are not separable, the structure's total shift is
    N x mean(r / N), so the per-atom mean residual becomes exactly zero."""
    from foundation.train.refit import per_atom_least_squares
    numbers = [np.array([6, 6, 1, 1, 1, 1, 1, 1, 8])] * 5
    residuals = np.array([0.10, 0.12, 0.08, 0.11, 0.09])
    delta = per_atom_least_squares(numbers, residuals)
    shift = 2 * delta[6] + 6 * delta[1] + delta[8]
    assert shift == pytest.approx(residuals.mean())
