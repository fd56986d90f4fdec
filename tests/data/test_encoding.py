"""Record encoding: exact round trip, no pickle, every kind of damage detected."""
import json
import struct
import zlib

import numpy as np
import pytest

from foundation.data.encoding import MAGIC, RecordError, decode_record, encode_record


def _fields(rng, n=7):
    pos = rng.normal(size=(n, 3)) * 10
    pos[0, 0] = -0.0
    pos[0, 1] = 5e-324  # subnormal
    pos[0, 2] = np.nextafter(1.0, 2.0)
    return {"atomic_numbers": rng.integers(1, 119, n).astype(np.uint8), "pos": pos,
            "cell": rng.normal(size=(3, 3)), "pbc": np.array([True, False, True]), "energy": np.float64(-1234.5678),
            "forces": rng.normal(size=(n, 3)), "i4": np.arange(5, dtype=np.int32), "f4": np.float32([1.5, 2.5]),
            "empty": np.zeros((0, 3))}


def test_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    for n in (1, 7, 64):
        fields = _fields(rng, n)
        out = decode_record(encode_record(fields))
        assert list(out) == list(fields)
        for k, v in fields.items():
            v = np.asarray(v)
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert out[k].tobytes() == v.tobytes(), k
            assert out[k].flags.writeable


def test_big_endian_input_stored_little_endian():
    a = np.arange(4, dtype=">f8") * 1.1
    out = decode_record(encode_record({"a": a}))["a"]
    assert out.dtype == np.dtype("<f8") and np.array_equal(out, a)


def test_object_dtypes_cannot_be_stored():
    with pytest.raises(ValueError, match="dtype"):
        encode_record({"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="dtype"):
        encode_record({"s": np.array(["text"])})


def _reseal(body: bytes, hlen: int, version=1) -> bytes:
    return struct.pack("<4sHHII", MAGIC, version, 0, hlen, zlib.crc32(body)) + body


def test_header_declaring_object_dtype_is_rejected_even_with_valid_crc():
    header = json.dumps({"f": [["x", "|O", [1]]]}).encode()
    header += b" " * (-(16 + len(header)) % 8)
    with pytest.raises(RecordError, match="not allowed"):
        decode_record(_reseal(header + b"\0" * 8, len(header)))


def test_damage_is_detected():
    raw = encode_record(_fields(np.random.default_rng(1)))
    with pytest.raises(RecordError, match="checksum"):
        flipped = bytearray(raw)
        flipped[-20] ^= 0x01
        decode_record(bytes(flipped))
    with pytest.raises(RecordError, match="truncated|checksum"):
        decode_record(raw[:-8])
    with pytest.raises(RecordError, match="truncated"):
        decode_record(raw[:10])
    with pytest.raises(RecordError, match="does not start"):
        decode_record(b"XXXX" + raw[4:])
    hlen = struct.unpack_from("<I", raw, 8)[0]
    with pytest.raises(RecordError, match="version 9"):
        decode_record(_reseal(raw[16:], hlen, version=9))
    with pytest.raises(RecordError, match="describes"):
        decode_record(_reseal(raw[16:-8], hlen))  # consistent CRC, missing payload


def test_header_cache_does_not_mix_records():
    rng = np.random.default_rng(2)
    a, b = _fields(rng, 5), _fields(rng, 5)
    ra, rb = decode_record(encode_record(a)), decode_record(encode_record(b))
    assert not np.array_equal(ra["pos"], rb["pos"])
    np.testing.assert_array_equal(ra["pos"], a["pos"])
