"""Fine-tuning data: files converted on the fly, FILE@INDEX frame selections (exact labels), missing inputs."""
from __future__ import annotations

import pytest
from finetune_helpers import R_MAX

from foundation import keys


def test_file_frame_selection_is_converted_exactly(setup, tmp_path):
    from ase.io import read

    from foundation.data import ShardedDataset
    from foundation.finetune.data import prepare_paths
    (path,) = prepare_paths([f"{setup / 'new_train.xyz'}@1:20:4"], tmp_path, R_MAX)
    want = read(setup / "new_train.xyz", "1:20:4")
    ds = ShardedDataset(path)
    assert len(ds) == len(want) == 5
    assert [float(ds.record(i)[keys.ENERGY]) for i in range(5)] == [a.get_potential_energy() for a in want]
    assert prepare_paths([f"{setup / 'new_train.xyz'}@1:20:4"], tmp_path, R_MAX) == [path]   # cached
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_paths([str(tmp_path / "absent.xyz")], tmp_path, R_MAX)


def test_replay_sample_keeps_the_labels_and_the_level_of_theory(setup, tmp_path):
    from foundation.data import ShardedDataset
    from foundation.data.convert import convert
    from foundation.finetune.data import sample_dataset
    source = convert([setup / "old.xyz"], tmp_path / "old", r_max=R_MAX, dataset_name="old-emt",
                     level_of_theory="EMT (ASE)", progress=False)
    sample = ShardedDataset(sample_dataset(str(source), 5, 0, tmp_path / "cache", R_MAX))
    assert sample.manifest["name"] == "old-emt-replay5-s0" and sample.manifest["level_of_theory"] == "EMT (ASE)"
    energies = {float(ShardedDataset(source).record(i)[keys.ENERGY]) for i in range(16)}
    assert len(sample) == 5 and {float(sample.record(i)[keys.ENERGY]) for i in range(5)} <= energies
