"""Training-data glue: head names, seeded disjoint validation split, statistics (manifest vs recomputed), errors."""
from __future__ import annotations

import numpy as np
import pytest

from foundation.train import data as tdata
from foundation.train.config import config_from_dict


def test_heads_and_validation_split(emt_data):
    cfg = config_from_dict({"data": {"train": [str(emt_data["train"]), str(emt_data["train_nostress"])],
                                     "heads": ["a", "b"], "valid_fraction": 0.25}, "seed": 4})
    assert tdata.head_names(cfg) == (["a", "b"], [0, 1])
    train, valid = tdata.open_datasets(cfg, r_max=4.0)
    again, _ = tdata.open_datasets(cfg, r_max=4.0)
    for t, v, t2, n in zip(train, valid, again, (40, 24)):
        assert len(t) + len(v) == n and len(v) == round(0.25 * n)
        assert not set(t.indices) & set(v.indices) and np.array_equal(t.indices, t2.indices)
    assert int(valid[1][0].head) == 1
    assert tdata.elements_of(train) == ["Ni", "Cu"]


def test_statistics_from_manifest_match_recomputation(emt_data):
    cfg = config_from_dict({"data": {"train": [str(emt_data["train"])], "valid_fraction": 0.0}})
    (ds,), _ = tdata.open_datasets(cfg, r_max=4.0)
    from_manifest = tdata.statistics([ds], r_max=4.0)
    recomputed = tdata.statistics([ds, ds], r_max=4.0)        # two datasets per head: computed from records
    for el in ("Cu", "Ni"):
        assert recomputed["atomic_energies"][el] == pytest.approx(from_manifest["atomic_energies"][el], abs=1e-8)
    assert recomputed["scale"] == pytest.approx(from_manifest["scale"], rel=1e-10)
    assert recomputed["avg_num_neighbors"] == pytest.approx(from_manifest["avg_num_neighbors"], rel=1e-10)
    (short,), _ = tdata.open_datasets(cfg, r_max=3.0)          # manifest was made at 4 Å: recount at 3 Å
    other_cutoff = tdata.statistics([short], r_max=3.0)
    assert other_cutoff["avg_num_neighbors"] < from_manifest["avg_num_neighbors"]


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="foundation data convert"):
        tdata.open_datasets(config_from_dict({"data": {"train": [str(tmp_path / "none")]}}), 4.0)
    xyz = tmp_path / "a.xyz"
    xyz.write_text("1\n\nH 0 0 0\n")
    with pytest.raises(ValueError, match="convert it first"):
        tdata.open_datasets(config_from_dict({"data": {"train": [str(xyz)]}}), 4.0)
    with pytest.raises(ValueError, match="data.train is empty"):
        tdata.open_datasets(config_from_dict({}), 4.0)


def test_float32_model_sees_residual_labels_exact_to_float32_rounding_of_the_residual(tmp_path):
    """Large-magnitude totals (about -1e5 eV, like a 200-atom DFT cell): the training loader keeps the labels
    float64 and a float32 model adds its E0 sum in float64, so the energy error the loss trains on is the exact
    residual (E - sum E0) minus the model's residual, not the residual of a total rounded to float32 (4-8 meV)."""
    import torch
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write
    from torch_geometric.data import Batch

    from foundation import FoundationModel, ModelConfig, keys
    from foundation.data.convert import convert
    from foundation.train.config import LossConfig
    from foundation.train.loss import Loss
    e0 = {"C": -31234.567891234, "O": -40321.123456789}
    rng = np.random.default_rng(0)
    frames, residuals = [], []
    for _ in range(16):
        atoms = Atoms("COO", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]] + 0.05 * rng.standard_normal((3, 3)))
        r = float(rng.uniform(-0.5, 0.5))                 # eV: what the model has to learn
        atoms.calc = SinglePointCalculator(atoms, energy=e0["C"] + 2 * e0["O"] + r, forces=np.zeros((3, 3)))
        frames.append(atoms)
        residuals.append(r)
    write(tmp_path / "big.xyz", frames, format="extxyz")
    ds = tdata._open(str(convert([tmp_path / "big.xyz"], tmp_path / "big", r_max=4.0, progress=False)), 4.0, 0, 0)
    batch = Batch.from_data_list([ds[i] for i in range(len(ds))])
    assert batch[keys.ENERGY].dtype == torch.float64                     # labels as stored
    from foundation.data import ShardedDataset
    item = ShardedDataset(tmp_path / "big", r_max=4.0, dtype=torch.float32)[0]   # a float32 dataset too
    assert item[keys.POSITIONS].dtype == torch.float32 and item[keys.ENERGY].dtype == torch.float64
    assert float(item[keys.ENERGY][0]) == frames[0].get_potential_energy()       # bit for bit from disk
    model = FoundationModel(ModelConfig(elements=["C", "O"], num_channels=8, max_L=0, num_layers=1, max_ell=1,
                                        correlation=2, r_max=4.0, radial_mlp=[8], readout_mlp=4, dtype="float32",
                                        atomic_energies=[e0["C"], e0["O"]], shift=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                              # residual prediction exactly 0: prediction = the E0 sum
    pred = model(batch, compute_forces=False)
    assert model.dtype == torch.float32 and pred[keys.ENERGY].dtype == torch.float64
    seen = (batch[keys.ENERGY] - pred[keys.ENERGY]).numpy()               # the residual the loss trains on
    exact = np.array(residuals)
    float32_ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(seen - exact) <= float32_ulp)                    # exact to float32 rounding of the residual
    rounded_total = np.array([np.float32(a.get_potential_energy()) for a in frames], np.float64)
    old = rounded_total - (e0["C"] + 2 * e0["O"])                         # what a float32 label gave
    assert np.max(np.abs(old - exact)) > 100 * np.max(float32_ulp)        # the test would catch the old path
    loss = Loss(LossConfig(coefficients={"energy": 1.0}), max_steps=1)
    sums = loss.sums({keys.ENERGY: pred[keys.ENERGY]}, batch)
    assert float(sums[loss.properties.index("energy")]) == pytest.approx(float(np.sum((exact / 3) ** 2)), rel=1e-9)


def test_a_one_structure_dataset_trains_without_validation_and_says_so(tmp_path, emt_data, capsys):
    from emt_data import write_emt_dataset
    from test_outdir import pair_model

    from foundation.train.loop import run
    one = write_emt_dataset(tmp_path / "one", 1, seed=5)
    cfg = config_from_dict({"out_dir": str(tmp_path / "out"), "max_steps": 2, "progress": False,
                            "data": {"train": [str(one)], "max_atoms": 64}})
    train, valid = tdata.open_datasets(cfg, r_max=4.0)
    assert [len(t) for t in train] == [1] and valid == []
    assert "has 1 structure(s), too few to hold out a validation split" in capsys.readouterr().out
    run(cfg, model=pair_model())
    assert (tmp_path / "out" / "checkpoints" / "step_00000002").is_dir()


def test_a_loss_term_no_training_structure_is_labelled_with_is_refused(tmp_path, emt_data, capsys):
    from foundation.cli import main as cli
    recipe = tmp_path / "nostress.yaml"
    recipe.write_text(f"out_dir: {tmp_path / 'out'}\nmax_steps: 1\nprogress: false\n"
                      f"data: {{train: [{emt_data['train_nostress']}], max_atoms: 64}}\n"
                      "loss: {coefficients: {energy: 1.0, forces: 10.0, stress: 10.0}}\n")
    assert cli(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "no training structure has a 'stress' label" in err and "loss.coefficients.stress=0" in err, err
    assert not (tmp_path / "out").exists()
    # a label present on some structures only trains (the loss masks the others)
    cfg = config_from_dict({"data": {"train": [str(emt_data["train_nostress"]), str(emt_data["train"])]},
                            "loss": {"coefficients": {"energy": 1.0, "stress": 1.0}}})
    tdata.check_loss_labels(cfg)
    counts = tdata.label_counts({"properties": ["energy"], "shards": [{"count": 3}, {"count": 2}]})
    assert counts == {"energy": 5}
    per_label = {"num_structures": 5, "properties": {"energy": {"unit": "eV", "count": 4},
                                                     "stress": {"unit": "eV/Å^3", "count": 0}}}
    assert tdata.label_counts(per_label) == {"energy": 4, "stress": 0}
