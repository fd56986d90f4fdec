"""scripts/bench_accuracy.py: split files keep the labels, our epoch length matches mace's batch count, and
mace_run_train logs are read correctly (epoch timing, test table)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from foundation import keys
from foundation.data.labels import read_labels

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_accuracy.py"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script(SCRIPT)


LOG = """2026-11-25 13:27:40.456 INFO: Number of gradient updates: 20
2026-11-25 13:27:40.669 INFO: Initial: head: Default, loss=14.47685814, MAE_E_per_atom=  134.81 meV, MAE_F=  913.40 meV / A
2026-11-25 13:27:42.790 INFO: Epoch 0: head: Default, loss=5.19479561, MAE_E_per_atom=  901.32 meV, MAE_F=  521.33 meV / A
2026-11-25 13:27:46.170 INFO: Epoch 1: head: Default, loss=4.19479561, MAE_E_per_atom=  801.32 meV, MAE_F=  421.33 meV / A
2026-11-25 13:27:44.618 INFO: Error-table on TRAIN and VALID:
+---------------+--------------------+-----------------+------------------+--------------------------------------+
|  config_type  | MAE E / meV / atom | MAE F / meV / A | relative F MAE % | MAE Stress (Virials) / meV / A (A^3) |
+---------------+--------------------+-----------------+------------------+--------------------------------------+
| train_Default |         899.1      |        509.6    |        56.93     |         7.7                          |
+---------------+--------------------+-----------------+------------------+--------------------------------------+
2026-11-25 13:27:45.043 INFO: Error-table on TEST:
+-----------------+--------------------+-----------------+------------------+--------------------------------------+
|   config_type   | MAE E / meV / atom | MAE F / meV / A | relative F MAE % | MAE Stress (Virials) / meV / A (A^3) |
+-----------------+--------------------+-----------------+------------------+--------------------------------------+
| Default_Default |          12.5      |        314.7    |        60.44     |         3.2                          |
+-----------------+--------------------+-----------------+------------------+--------------------------------------+
2026-11-25 13:27:46.236 INFO: Done
| not | a | table | row |
"""


def test_mace_log_parsing(bench):
    assert bench.mace_epoch_seconds(LOG, 2) == pytest.approx((46.170 - 40.669) / 2)
    assert bench.mace_test_errors(LOG) == {"e_mae_mev_atom": 12.5, "f_mae_mev_A": 314.7, "s_mae_mev_A3": 3.2}
    no_stress = LOG.replace(" MAE Stress (Virials) / meV / A (A^3) |", "").replace("         3.2          "
                                                                                      "                |", "")
    assert bench.mace_test_errors(no_stress)["s_mae_mev_A3"] is None
    with pytest.raises(ValueError, match="Epoch 4"):
        bench.mace_epoch_seconds(LOG, 5)
    with pytest.raises(ValueError, match="Error-table on TEST"):
        bench.mace_test_errors(LOG.split("Error-table on TEST")[0])


def test_labelled_copy_round_trip(bench, tmp_path):
    """Energy, forces and stress (ASE sign, non-symmetric check of the layout) survive the REF_ extxyz files
    that both codes read; config_type is dropped."""
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.05, seed=1)
    si.cell[0, 1] = 0.2
    from ase.calculators.singlepoint import SinglePointCalculator
    stress = np.array([[0.01, 0.002, -0.003], [0.002, -0.02, 0.004], [-0.003, 0.004, 0.005]])
    si.calc = SinglePointCalculator(si, energy=-43.2, forces=np.arange(24.0).reshape(8, 3) / 10, stress=stress)
    si.info["config_type"] = "Elastic"
    h2o = molecule("H2O")
    h2o.calc = EMT()
    h2o_f = h2o.get_forces()
    path = tmp_path / "x.xyz"
    write(str(path), [bench.labelled_copy(si, True), bench.labelled_copy(h2o, False)], format="extxyz")
    back = read(str(path), ":")
    a, b = read_labels(back[0]), read_labels(back[1])
    assert a[keys.ENERGY] == pytest.approx(-43.2)
    np.testing.assert_allclose(a[keys.FORCES], np.arange(24.0).reshape(8, 3) / 10)
    np.testing.assert_allclose(a[keys.STRESS], stress)
    np.testing.assert_allclose(back[0].cell.array, si.cell.array)
    assert "config_type" not in back[0].info and keys.STRESS not in b
    np.testing.assert_allclose(b[keys.FORCES], h2o_f)
    with pytest.raises(ValueError, match="lacks"):
        bench.labelled_copy(h2o, True)


def test_batches_per_epoch(bench):
    """Fixed-size molecules: max_atoms = B x natoms gives exactly ceil(N / B) batches, as mace's batch_size B."""
    assert bench.batches_per_epoch(np.full(950, 9), 45, 3) == [190, 190, 190]
    assert bench.batches_per_epoch(np.full(12, 21), 105, 1) == [3]
    natoms = np.random.default_rng(0).integers(2, 97, 194)            # variable cells: greedy packing
    lower = int(np.ceil(natoms.sum() / 309))
    assert all(lower <= c <= 1.2 * lower for c in bench.batches_per_epoch(natoms, 309, 2))


def test_format_table(bench):
    rows = [{"system": "si", "code": "ours", "epochs": 3, "params": 50512, "s_per_epoch": 25.61,
             "cpu_s_per_epoch": 12.0, "e_mae_mev_atom": 98.94, "e_mae_mev": 5698.2, "f_mae_mev_A": 113.8,
             "s_mae_mev_A3": 14.87, "load": "10.07 9 9"},
            {"system": "si", "code": "mace-torch", "epochs": 3, "params": 50512, "s_per_epoch": 29.4,
             "cpu_s_per_epoch": None, "e_mae_mev_atom": 87.5, "e_mae_mev": None, "f_mae_mev_A": 132.6,
             "s_mae_mev_A3": None, "load": "10.89 9 9"}]
    lines = bench.format_table(rows).splitlines()
    assert lines[0].split()[:4] == ["system", "code", "epochs", "params"]
    assert lines[1].split() == ["si", "ours", "3", "50512", "25.6", "12.0", "98.94", "5698.2", "113.8", "14.87",
                                "10.07"]
    assert lines[2].split() == ["si", "mace-torch", "3", "50512", "29.4", "-", "87.50", "-", "132.6", "-", "10.89"]
    assert len({len(line) for line in lines[1:]}) == 1   # aligned columns


def test_ours_overrides_apply_to_the_recipe(bench, tmp_path):
    """The script's --set overrides (and --ours-set, after them) give a valid config of the shipped recipe with
    the benchmark's size, length and data; --ours-set wins over the recipe."""
    from foundation.train.config import load_config
    a = bench.parse_args(["--epochs", "2", "--channels", "16", "--ours-set", "optim.amsgrad=false",
                          "--ours-set", "ema.decay=0.9"])
    sets = bench.ours_overrides(a, "ethanol", tmp_path / "lmdb", tmp_path / "run", 45, [190, 190])
    cfg = load_config(bench.REPO / "recipes" / "bench" / "rmd17.yaml", sets)
    assert cfg.max_steps == 380 and cfg.valid_every == 190 and cfg.data.max_atoms == 45
    assert cfg.model.overrides["num_channels"] == 16 and cfg.data.train == [str(tmp_path / "lmdb" / "train")]
    assert cfg.optim.amsgrad is False and cfg.ema.decay == 0.9


@pytest.mark.slow
def test_quick_run_of_ours(bench, tmp_path, capsys):
    """--quick (ethanol, 100 frames, 1 epoch, 8 channels), our side only: finite errors in the JSON and the
    printed table, and the energy offset removed by the recipe's refit_e0 is recorded."""
    import json
    data = Path(__file__).resolve().parents[2] / "data"
    out = tmp_path / "out.json"
    assert bench.main(["--quick", "--codes", "ours", "--data", str(data), "--out", str(tmp_path / "w"),
                       "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["system"] == "ethanol" and row["code"] == "ours" and row["epochs"] == 1
    assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("e_mae_mev_atom", "f_mae_mev_A", "cpu_s_per_epoch"))
    assert len(row["refit_e0_offset_mev_atom"]) == 1 and np.isfinite(row["refit_e0_offset_mev_atom"][0])
    table = capsys.readouterr().out
    assert any(line.split()[:2] == ["ethanol", "ours"] for line in table.splitlines())
