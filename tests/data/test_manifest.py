"""Manifest reading: every inconsistency is an error that names the file and says what to do."""
import json

import pytest

from foundation.data.manifest import MANIFEST_FORMAT, read_manifest, sha256_file, write_json_synced


def _manifest(**over):
    m = {"format": MANIFEST_FORMAT, "schema_version": 1, "num_structures": 3, "elements": ["H"],
         "properties": {}, "shards": [{"file": "shard-00000.lmdb", "count": 3, "sha256": "0" * 64}]}
    m.update(over)
    return m


def test_valid_manifest_round_trips(tmp_path):
    write_json_synced(tmp_path / "manifest.json", _manifest(name="ü-data"))
    assert read_manifest(tmp_path)["name"] == "ü-data"


@pytest.mark.parametrize("over, message", [
    ({"schema_version": 99}, "schema version 99 is not supported"),
    ({"num_structures": 4}, "shards hold 3 structures but num_structures is 4"),
    ({"format": "something-else"}, "not a foundation manifest"),
])
def test_inconsistent_manifests(tmp_path, over, message):
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(**over)))
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(tmp_path)
    assert "manifest.json" in str(info.value)


def test_missing_required_keys(tmp_path):
    m = _manifest()
    del m["shards"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="missing \\['shards'\\]"):
        read_manifest(tmp_path)


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib
    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob", chunk=4096) == hashlib.sha256(data).hexdigest()
