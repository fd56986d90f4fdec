"""LMDB shards: one single-file LMDB environment per shard, records under fixed-width integer keys.

A shard holds ``count`` records (``encoding.encode_record``) under the 8-byte big-endian keys 0..count-1, plus
two metadata entries: ``__metadata__`` (JSON: schema version, count, elements, property keys) and
``__natoms__`` (raw little-endian int32, atoms per record). Readers open the file read-only without locks,
lazily, and re-open after a fork (an LMDB environment must not be shared across processes).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import lmdb
import numpy as np

from .encoding import RecordError, decode_record, encode_record

SHARD_FORMAT = "foundation-shard"
SHARD_SCHEMA_VERSION = 1
META_KEY = b"__metadata__"
NATOMS_KEY = b"__natoms__"
_KEY = struct.Struct(">Q")
_INITIAL_MAP_SIZE = 1 << 26


def record_key(index: int) -> bytes:
    """The LMDB key of record ``index`` (8-byte big-endian, so keys sort in record order)."""
    return _KEY.pack(index)


class ShardWriter:
    """Append records to a new shard file; ``close()`` writes the metadata. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, commit_every: int = 512):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"shard {self.path} already exists; write shards into a fresh directory")
        self._map_size = _INITIAL_MAP_SIZE
        self._env = lmdb.open(str(self.path), map_size=self._map_size, subdir=False, meminit=True,
                              sync=False, lock=False, readahead=False)
        self._pending: list[tuple[bytes, bytes]] = []
        self._commit_every = commit_every
        self.natoms: list[int] = []
        self.elements: set[int] = set()

    def append(self, fields: Mapping[str, np.ndarray]) -> int:
        """Encode and add one record (fields as for ``encode_record``, with ``atomic_numbers``); returns its index."""
        numbers = np.asarray(fields["atomic_numbers"])
        index = len(self.natoms)
        self._pending.append((record_key(index), encode_record(fields)))
        self.natoms.append(len(numbers))
        self.elements.update(int(z) for z in np.unique(numbers))
        if len(self._pending) >= self._commit_every:
            self._flush()
        return index

    def _put_all(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v)
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def _flush(self) -> None:
        if self._pending:
            self._put_all(self._pending)
            self._pending = []

    def close(self, properties: list[str], extra: Mapping | None = None) -> dict:
        """Write metadata, sync to disk and close; returns the metadata dict."""
        self._flush()
        meta = {"format": SHARD_FORMAT, "schema_version": SHARD_SCHEMA_VERSION, "count": len(self.natoms),
                "num_atoms": int(sum(self.natoms)), "elements": sorted(self.elements),
                "properties": list(properties), **dict(extra or {})}
        natoms = np.asarray(self.natoms, dtype="<i4").tobytes()
        self._put_all([(META_KEY, json.dumps(meta, sort_keys=True).encode()), (NATOMS_KEY, natoms)])
        self._env.sync(True)
        self._env.close()
        return meta

    def abort(self) -> None:
        """Close without metadata (the caller deletes the file)."""
        self._pending = []
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class ShardReader:
    """Read-only access to one shard: ``len``, ``natoms`` (int32 array), ``metadata``, ``get(i)`` -> arrays.

    The LMDB environment is opened on first use in each process (checked with ``os.getpid()``), so a reader
    created in the parent process is safe to use in forked DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"shard file {self.path} does not exist; check the dataset path "
                                    f"or re-run `foundation data convert`")
        self._env = None
        self._txn = None
        self._pid = None

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            try:
                self._env = lmdb.open(str(self.path), subdir=False, readonly=True, lock=False, readahead=False,
                                      meminit=False, max_readers=1)
                self._txn = self._env.begin(buffers=False)
            except lmdb.Error as exc:
                self._env = None
                raise ValueError(f"shard {self.path} cannot be opened as LMDB ({exc}); the file is truncated or "
                                 f"corrupted: re-download it or re-run `foundation data convert`") from None
            self._pid = os.getpid()
        return self._txn

    def close(self) -> None:
        """Close the environment (it is reopened on the next access)."""
        if self._env is not None and self._pid == os.getpid():
            self._txn = None
            self._env.close()
        self._env = self._txn = self._pid = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _get(self, key: bytes, what: str) -> bytes:
        try:
            value = self._open().get(key)
        except lmdb.Error as exc:
            raise ValueError(f"shard {self.path}: reading {what} failed ({exc}); the file is corrupted: "
                             f"re-download it or re-run `foundation data convert`") from None
        if value is None:
            raise ValueError(f"shard {self.path} has no {what}; the file is truncated or not a foundation shard: "
                             f"re-download it or re-run `foundation data convert`")
        return value

    @property
    def metadata(self) -> dict:
        try:
            meta = json.loads(self._get(META_KEY, "metadata record"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"shard {self.path}: metadata is not valid JSON ({exc}); re-convert the dataset") from None
        if meta.get("format") != SHARD_FORMAT or meta.get("schema_version") != SHARD_SCHEMA_VERSION:
            raise ValueError(f"shard {self.path}: format {meta.get('format')!r} version {meta.get('schema_version')!r}"
                             f" is not {SHARD_FORMAT!r} version {SHARD_SCHEMA_VERSION}; upgrade foundation or "
                             f"re-convert the dataset")
        return meta

    @property
    def natoms(self) -> np.ndarray:
        """(count,) int32, atoms per record."""
        raw = self._get(NATOMS_KEY, "natoms record")
        if len(raw) % 4:
            raise ValueError(f"shard {self.path}: natoms record has {len(raw)} bytes, not a multiple of 4; re-convert")
        return np.frombuffer(raw, dtype="<i4").astype(np.int32)

    def __len__(self) -> int:
        return int(self.metadata["count"])

    def get_raw(self, index: int) -> bytes:
        return self._get(record_key(index), f"record {index}")

    def get(self, index: int, check_crc: bool = True) -> dict[str, np.ndarray]:
        """Decoded record ``index``: atomic_numbers (n,) uint8, pos (n,3) f8 Å, cell (3,3) f8 Å, pbc (3,), labels."""
        try:
            return decode_record(self.get_raw(index), check_crc=check_crc)
        except RecordError as exc:
            raise ValueError(f"shard {self.path}, record {index}: {exc}; re-download the shard or re-run "
                             f"`foundation data convert`") from None
