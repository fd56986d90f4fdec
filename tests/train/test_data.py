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


def test_a_one_structure_dataset_trains_without_validation_and_says_so(tmp_path, emt_data, capsys):
    from conftest import write_emt_dataset
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
