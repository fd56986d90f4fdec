"""The on-disk encoding of one structure: an explicit, versioned binary record (never pickle).

Layout of a record (all integers little-endian)::

    bytes 0-3    magic b"FREC"
    bytes 4-5    uint16 format version (RECORD_VERSION)
    bytes 6-7    uint16 reserved (0)
    bytes 8-11   uint32 length H of the JSON header
    bytes 12-15  uint32 CRC-32 of everything after byte 16 (header + payload)
    bytes 16-    JSON header (UTF-8), space-padded so the payload starts at a multiple of 8:
                 {"f": [[name, dtype, [shape...]], ...]}
    then         the raw little-endian bytes of each array in header order, each padded to a multiple of 8

Only plain numeric dtypes (``ALLOWED_DTYPES``) can be declared, so decoding never constructs Python objects
from the file: a downloaded dataset cannot run code. Arrays are stored with their own dtype, so float64
positions and labels round-trip bit for bit. The parsed layout of a header is cached (records of the same
size share a header), so decoding does not parse JSON per record.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping

import numpy as np

MAGIC = b"FREC"
RECORD_VERSION = 1
_PREFIX = struct.Struct("<4sHHII")
ALLOWED_DTYPES = {"<f8", "<f4", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"}
_LAYOUT_CACHE: dict[bytes, tuple[list[tuple[str, np.dtype, tuple[int, ...], int, int]], int]] = {}
_LAYOUT_CACHE_MAX = 8192


class RecordError(ValueError):
    """A record that cannot be decoded (truncated, corrupted, or written by an unknown format version)."""


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def encode_record(fields: Mapping[str, np.ndarray]) -> bytes:
    """Encode named numeric arrays (any shape, dtypes in ``ALLOWED_DTYPES`` after little-endian conversion)."""
    arrays, spec = [], []
    for name, value in fields.items():
        a = np.asarray(value)
        if a.dtype.byteorder in ("=", ">"):
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.str not in ALLOWED_DTYPES:
            raise ValueError(f"field {name!r} has dtype {a.dtype}; only {sorted(ALLOWED_DTYPES)} can be stored")
        spec.append([name, a.dtype.str, list(a.shape)])
        arrays.append(a)
    header = json.dumps({"f": spec}, separators=(",", ":")).encode()
    header += b" " * (_pad8(_PREFIX.size + len(header)) - _PREFIX.size - len(header))
    parts = [header]
    for a in arrays:
        raw = a.tobytes(order="C")
        parts.append(raw + b"\0" * (_pad8(len(raw)) - len(raw)))
    body = b"".join(parts)
    return _PREFIX.pack(MAGIC, RECORD_VERSION, 0, len(header), zlib.crc32(body)) + body


def _layout(header: bytes):
    """(fields, total length) for a header: fields are (name, dtype, shape, offset, nbytes)."""
    cached = _LAYOUT_CACHE.get(header)
    if cached is not None:
        return cached
    try:
        spec = json.loads(header)["f"]
        fields, offset = [], _PREFIX.size + len(header)
        for name, dtype, shape in spec:
            if dtype not in ALLOWED_DTYPES:
                raise RecordError(f"field {name!r} declares dtype {dtype!r}, which is not allowed")
            dt = np.dtype(dtype)
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise RecordError(f"field {name!r} declares a negative shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            fields.append((str(name), dt, shape, offset, nbytes))
            offset += _pad8(nbytes)
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"unreadable record header ({exc})") from None
    if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_MAX:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[header] = (fields, offset)
    return fields, offset


def decode_record(buf: bytes | bytearray | memoryview, check_crc: bool = True) -> dict[str, np.ndarray]:
    """Decode a record into writable numpy arrays (one copy of ``buf``); raises ``RecordError`` if it is bad."""
    if len(buf) < _PREFIX.size:
        raise RecordError(f"record is {len(buf)} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated)")
    magic, version, _, hlen, crc = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RecordError(f"record does not start with {MAGIC!r} (corrupted, or not a foundation shard)")
    if version != RECORD_VERSION:
        raise RecordError(f"record format version {version} is not supported (this code reads {RECORD_VERSION}); "
                          f"upgrade foundation or re-convert the dataset")
    data = bytearray(buf)
    if check_crc and zlib.crc32(memoryview(data)[_PREFIX.size:]) != crc:
        raise RecordError("record checksum mismatch (corrupted bytes)")
    fields, total = _layout(bytes(data[_PREFIX.size:_PREFIX.size + hlen]))
    if total != len(data):
        raise RecordError(f"record is {len(data)} bytes but its header describes {total} (truncated or corrupted)")
    return {name: np.frombuffer(data, dt, count=nbytes // dt.itemsize, offset=off).reshape(shape)
            for name, dt, shape, off, nbytes in fields}
