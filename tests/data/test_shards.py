"""Shard writer/reader: round trip, metadata, lazy per-process opening, damaged files."""
import multiprocessing as mp

import numpy as np
import pytest

from foundation.data.shards import ShardReader, ShardWriter, record_key


def _write(path, count=50, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    with ShardWriter(path, commit_every=16) as w:
        for i in range(count):
            n = int(rng.integers(1, 30))
            rec = {"atomic_numbers": rng.integers(1, 90, n).astype(np.uint8), "pos": rng.normal(size=(n, 3)),
                   "energy": np.float64(rng.normal())}
            assert w.append(rec) == i
            records.append(rec)
        meta = w.close(["energy"])
    return records, meta


def test_round_trip_and_metadata(tmp_path):
    records, meta = _write(tmp_path / "s.lmdb")
    r = ShardReader(tmp_path / "s.lmdb")
    assert len(r) == 50 == meta["count"] and r.metadata["properties"] == ["energy"]
    assert r.natoms.dtype == np.int32 and r.natoms.tolist() == [len(x["atomic_numbers"]) for x in records]
    assert r.metadata["num_atoms"] == int(r.natoms.sum())
    assert r.metadata["elements"] == sorted({int(z) for x in records for z in x["atomic_numbers"]})
    for i, rec in enumerate(records):
        out = r.get(i)
        for k in rec:
            assert out[k].tobytes() == np.asarray(rec[k]).tobytes()
    assert record_key(1) < record_key(256) < record_key(2**40)
    with pytest.raises(ValueError, match="record 50"):
        r.get(50)


def test_same_records_give_identical_bytes(tmp_path):
    _write(tmp_path / "a.lmdb")
    _write(tmp_path / "b.lmdb")
    assert (tmp_path / "a.lmdb").read_bytes() == (tmp_path / "b.lmdb").read_bytes()


def test_map_grows_for_large_shards(tmp_path, monkeypatch):
    import foundation.data.shards as shards
    monkeypatch.setattr(shards, "_INITIAL_MAP_SIZE", 1 << 16)
    records, _ = _write(tmp_path / "big.lmdb", count=300)
    r = ShardReader(tmp_path / "big.lmdb")
    assert len(r) == 300 and r.get(299)["pos"].tobytes() == records[299]["pos"].tobytes()


def _child_read(path, queue):
    queue.put(float(ShardReader.get(_SHARED[0], 3)["energy"]))


_SHARED = []


def test_reader_reopens_after_fork(tmp_path):
    records, _ = _write(tmp_path / "s.lmdb")
    r = ShardReader(tmp_path / "s.lmdb")
    r.get(0)  # opened in the parent
    _SHARED[:] = [r]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(tmp_path, q))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and q.get(timeout=5) == float(records[3]["energy"])
    assert r.get(3)["energy"] == records[3]["energy"]


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.lmdb"):
        ShardReader(tmp_path / "nope.lmdb")
    _write(tmp_path / "s.lmdb")
    data = (tmp_path / "s.lmdb").read_bytes()
    (tmp_path / "t.lmdb").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="t.lmdb"):
        _ = ShardReader(tmp_path / "t.lmdb").natoms
    (tmp_path / "junk.lmdb").write_bytes(b"not an lmdb file" * 1000)
    with pytest.raises(ValueError, match="junk.lmdb"):
        _ = ShardReader(tmp_path / "junk.lmdb").metadata


def test_writer_refuses_existing_file(tmp_path):
    (tmp_path / "x.lmdb").write_bytes(b"")
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "x.lmdb")
