"""Validation metrics: MAE/RMSE per dataset, head and property against numpy; NaN labels skipped; rank reduction;
CSV logs that drop rows after the resume step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from foundation import keys
from foundation.train.csvlog import read_csv
from foundation.train.logger import RunLogger
from foundation.train.metrics import MetricAccumulator, card_metrics, flatten


def batch(rng):
    items = []
    for i, n in enumerate([2, 3, 4]):
        d = Data(atomic_numbers=torch.ones(n, dtype=torch.long), natoms=torch.tensor([n]),
                 energy=torch.tensor([float(rng.normal())]), forces=torch.tensor(rng.normal(size=(n, 3))),
                 stress=torch.full((1, 3, 3), float("nan")) if i == 1 else torch.tensor(rng.normal(size=(1, 3, 3))),
                 head=torch.tensor([i % 2]), **{keys.DATASET: torch.tensor([0 if i < 2 else 1])})
        d.num_nodes = n
        items.append(d)
    b = Batch.from_data_list(items)
    b[keys.DATASET] = torch.tensor([0, 0, 1])    # PyG would offset a field named *index*: set it explicitly
    return b


def test_metrics_match_numpy_per_group():
    rng = np.random.default_rng(0)
    b = batch(rng)
    pred = {keys.ENERGY: b[keys.ENERGY] + torch.tensor([0.3, -0.6, 0.9], dtype=torch.float64),
            keys.FORCES: b[keys.FORCES] + 0.1 * torch.tensor(rng.normal(size=(9, 3))),
            keys.STRESS: torch.zeros(3, 3, 3, dtype=torch.float64)}
    acc = MetricAccumulator(["a", "b"], ["h0", "h1"])
    acc.update(pred, b)
    res = acc.result()
    assert res["a/h0/energy_per_atom"]["mae"] == pytest.approx(0.3 / 2)
    assert res["a/h1/energy_per_atom"]["mae"] == pytest.approx(0.6 / 3)
    assert res["b/h0/energy"]["mae"] == pytest.approx(0.9)
    assert "a/h1/stress" not in res                              # the NaN stress is skipped
    s = b[keys.STRESS][[0, 2]].numpy()
    assert res["all/stress"]["rmse"] == pytest.approx(np.sqrt(np.mean(s ** 2)))
    assert res["all/stress"]["count"] == 18
    err = (pred[keys.FORCES] - b[keys.FORCES]).numpy()
    assert res["all/forces"]["mae"] == pytest.approx(np.abs(err).mean())
    assert res["b/h0/forces"]["rmse"] == pytest.approx(np.sqrt((err[5:] ** 2).mean()))
    doubled = MetricAccumulator(["a", "b"], ["h0", "h1"])
    doubled.update(pred, b)
    doubled.reduce(lambda t: 2 * t)                              # as if two ranks saw the same data
    assert doubled.result()["all/forces"]["count"] == 2 * res["all/forces"]["count"]
    assert doubled.result()["all/forces"]["mae"] == pytest.approx(res["all/forces"]["mae"])
    assert flatten(res)["valid/all/forces_mae"] == res["all/forces"]["mae"]
    assert card_metrics(res)["a/h0"]["energy_per_atom_mae_meV_per_atom"] == pytest.approx(150.0)


def test_csv_log_resume_drops_later_rows(tmp_path):
    log = RunLogger(tmp_path, True, start_step=0, total=5, progress=False)
    for step in range(1, 6):
        log.train(step, {"loss": 1.0 / step, "atoms_per_s": 1.0})
    log.close()
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    log = RunLogger(tmp_path, True, start_step=3, total=5, progress=False)
    log.train(4, {"loss": 0.125, "atoms_per_s": 1.0})
    cols = read_csv(tmp_path / "train.csv")
    assert cols["step"].tolist() == [1, 2, 3, 4] and cols["loss"][-1] == 0.125
    assert cols["loss"][2] == 1.0 / 3                              # exact round trip of floats
