"""Fine-tuning data: files converted on the fly, FILE@INDEX frame selections (exact labels), missing inputs."""
from __future__ import annotations

import pytest

from foundation import keys
from test_finetune import R_MAX, setup  # noqa: F401  (module fixture: EMT extxyz files)


def test_file_frame_selection_is_converted_exactly(setup, tmp_path):
    from ase.io import read

    from foundation.data import ShardedDataset
    from foundation.train.finetune import prepare_paths
    (path,) = prepare_paths([f"{setup / 'new_train.xyz'}@1:20:4"], tmp_path, R_MAX)
    want = read(setup / "new_train.xyz", "1:20:4")
    ds = ShardedDataset(path)
    assert len(ds) == len(want) == 5
    assert [float(ds.record(i)[keys.ENERGY]) for i in range(5)] == [a.get_potential_energy() for a in want]
    assert prepare_paths([f"{setup / 'new_train.xyz'}@1:20:4"], tmp_path, R_MAX) == [path]   # cached
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_paths([str(tmp_path / "absent.xyz")], tmp_path, R_MAX)
