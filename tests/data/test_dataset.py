"""ShardedDataset: items identical to from_atoms, several sources, workers, index memory, damaged data."""
import json
import tracemalloc

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from torch.utils.data import DataLoader
from torch_geometric.data import Batch

from foundation import keys
from foundation.data import ShardedDataset, from_atoms
from foundation.data.convert import convert
from foundation.data.shards import ShardWriter


@pytest.fixture(scope="module")
def converted(tmp_path_factory, emt_xyz):
    path, frames = emt_xyz
    out = convert([path], tmp_path_factory.mktemp("ds") / "emt", shard_size=8, progress=False)
    return out, frames


def _assert_same_data(a, b):
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        va, vb = a[k], b[k]
        if torch.is_tensor(va):
            assert va.dtype == vb.dtype and torch.equal(va, vb), k
        else:
            assert va == vb, k


@pytest.mark.parametrize("r_max", [None, 3.0, 5.0])
def test_items_equal_from_atoms(converted, r_max):
    out, frames = converted
    ds = ShardedDataset(out, r_max=r_max, dtype=torch.float64, head=1, dataset_index=3)
    for i in (0, 7, 8, 29, -1):
        ref = from_atoms(frames[i], r_max, dtype=torch.float64, head=1, dataset_index=3)
        _assert_same_data(ds[i], ref)
    item = ds[5]
    if r_max is None:
        assert keys.EDGE_INDEX not in item
    else:
        assert item.edge_index.shape[1] > 0 and item.shifts.shape == (item.edge_index.shape[1], 3)
    assert ShardedDataset(out, r_max=r_max)[5].pos.dtype == torch.get_default_dtype()


def test_molecules_without_cell(tmp_path):
    frames = []
    for name in ("CH3CH2OH", "C6H6", "H2O"):
        m = molecule(name)
        m.calc = SinglePointCalculator(m, energy=-float(len(m)), forces=np.ones((len(m), 3)))
        frames.append(m)
    ase.io.write(tmp_path / "mol.xyz", frames)
    ds = ShardedDataset(convert([tmp_path / "mol.xyz"], tmp_path / "mol", progress=False), r_max=4.0,
                        dtype=torch.float64)
    for i, m in enumerate(ase.io.read(tmp_path / "mol.xyz", ":")):
        _assert_same_data(ds[i], from_atoms(m, 4.0, dtype=torch.float64))
    assert not ds[1].pbc.any() and torch.all(ds[1].shifts == 0)


def test_sources_index_and_attributes(converted):
    out, frames = converted
    ds = ShardedDataset(out)
    assert len(ds) == 30 and ds.natoms.dtype == np.int32 and ds.natoms.tolist() == [len(a) for a in frames]
    assert ds.shard_offsets.tolist() == [0, 8, 16, 24, 30] and ds.locate(17) == (2, 1)
    assert ds.manifest["num_structures"] == 30 and set(ds.reference_energies) == {13, 28, 29}
    assert ds.statistics["avg_num_neighbors"] == ds.manifest["statistics"]["avg_num_neighbors"]
    with pytest.raises(IndexError):
        ds[30]
    both = ShardedDataset([out, out], r_max=None)
    assert len(both) == 60 and both.manifest is None and both.natoms[30:].tolist() == ds.natoms.tolist()
    shards = sorted(out.glob("*.lmdb"))
    only = ShardedDataset(shards[1:3])
    assert len(only) == 16 and torch.equal(only[0].pos, ds[8].pos) and only.manifest is None
    with pytest.raises(FileNotFoundError, match="neither"):
        ShardedDataset(out / "nothing-here")


def test_dataloader_workers_give_the_same_batches(converted):
    out, _ = converted
    ds = ShardedDataset(out, r_max=4.0)
    ds[0]  # open shards in the parent before forking
    serial = [Batch.from_data_list([ds[i] for i in range(j, min(j + 7, 30))]) for j in range(0, 30, 7)]
    loader = DataLoader(ds, batch_size=7, num_workers=2, collate_fn=Batch.from_data_list,
                        multiprocessing_context="fork")
    for a, b in zip(loader, serial):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.edge_index, b.edge_index)
        assert torch.equal(a[keys.ENERGY], b[keys.ENERGY])


def test_index_memory_is_a_few_bytes_per_structure(tmp_path):
    count = 40000
    with ShardWriter(tmp_path / "many.lmdb", commit_every=5000) as w:
        rec = {keys.ATOMIC_NUMBERS: np.array([1], np.uint8), keys.POSITIONS: np.zeros((1, 3)),
               keys.CELL: np.zeros((3, 3)), keys.PBC: np.zeros(3, bool)}
        for _ in range(count):
            w.append(rec)
        w.close([])
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ds = ShardedDataset(tmp_path / "many.lmdb")
    retained = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(ds) == count and retained < 8 * count + 50_000, retained


def test_damaged_data_is_reported(converted, tmp_path):
    import shutil
    src, frames = converted
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shard = out / "shard-00001.lmdb"
    # a corrupted record: flip one bit of a known position value inside the file
    pos_bytes = frames[9].positions[1].tobytes()
    raw = bytearray(shard.read_bytes())
    at = raw.find(pos_bytes)
    assert at > 0
    raw[at] ^= 0x10
    shard.write_bytes(bytes(raw))
    ds = ShardedDataset(out)
    ds[8]
    with pytest.raises(ValueError, match=r"shard-00001\.lmdb, record 1: record checksum mismatch"):
        ds[9]
    # a truncated shard: refused at open, naming the file
    shard.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match=r"shard-00001\.lmdb is \d+ bytes but .*manifest"):
        ShardedDataset(out)
    with pytest.raises(ValueError, match=r"shard-00001\.lmdb is truncated"):
        ShardedDataset(shard)
    # a manifest whose counts disagree with the shards
    shutil.copy(src / "shard-00001.lmdb", shard)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["count"] += 1
    m["num_structures"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard-00000\.lmdb holds 8 structures but the manifest says 9"):
        ShardedDataset(out)
    (out / "shard-00002.lmdb").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.lmdb"):
        ShardedDataset(out)
