"""inspect: the summary table, and --verify catching every kind of damage with file and record."""
import json

import pytest

from foundation.data.convert import convert
from foundation.data.inspect import inspect
from foundation.data.manifest import sha256_file


@pytest.fixture()
def dataset(tmp_path, emt_xyz):
    path, frames = emt_xyz
    return convert([path], tmp_path / "ds", shard_size=12, progress=False, level_of_theory="EMT"), frames


def test_summary_lists_manifest_and_statistics(dataset):
    out, frames = dataset
    text = inspect(out)
    for needle in ("structures       30", "Al Ni Cu", "EMT", "forces        eV/Å    per atom",
                   "mean neighbors at r_max", "force RMS", "reference energies", "shard-00002.lmdb",
                   "bytes/atom", "emt.xyz"):
        assert needle in text, needle
    assert "verified" not in text
    assert "verified: 3 shards, 30 records" in inspect(out, verify=True)


def test_verify_detects_checksum_mismatch_and_bad_records(dataset):
    out, frames = dataset
    shard = out / "shard-00001.lmdb"
    raw = bytearray(shard.read_bytes())
    at = raw.find(frames[15].positions[0].tobytes())
    raw[at + 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard-00001\.lmdb: sha256 .* does not match the manifest"):
        inspect(out, verify=True)
    # make the manifest agree with the damaged file: the record itself must still be caught, by index
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_file(shard)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard-00001\.lmdb, record 3: record checksum mismatch"):
        inspect(out, verify=True)


def test_verify_detects_truncated_and_missing_shards(dataset, tmp_path):
    out, _ = dataset
    shard = out / "shard-00002.lmdb"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ValueError, match=r"shard-00002\.lmdb"):
        inspect(out, verify=True)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.lmdb"):
        inspect(out, verify=True)


def test_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        inspect(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        inspect(tmp_path)
