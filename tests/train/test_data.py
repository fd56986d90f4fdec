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
