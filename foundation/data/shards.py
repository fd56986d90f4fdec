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
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

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

    def _put_all(self, items: list[tuple[bytes, bytes]], append: bool = False) -> None:
        """Write items in one transaction (``append``: keys ascending, so LMDB fills pages completely)."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v, append=append)
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def _flush(self) -> None:
        if self._pending:
            self._put_all(self._pending, append=True)
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


_LMDB_MAGIC = 0xBEEFC0DE


def check_lmdb_file(path: Path) -> None:
    """Raise ``ValueError`` if ``path`` is not a complete LMDB file (checked from its meta pages).

    Opening a truncated LMDB file maps pages past its end, and touching them kills the process with SIGBUS;
    this check turns that into an error message. Layout (64-bit LMDB): meta pages 0 and 1, each a 16-byte
    page header then magic (u32) at +16, the page size in the free-DB record at +40, last page number at +136
    and transaction id at +144; the newest meta page says how many pages the file must have.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16 + 160)
        if len(head) < 152 or struct.unpack_from("<I", head, 16)[0] != _LMDB_MAGIC:
            raise ValueError(f"shard {path} is not an LMDB file (bad header); re-download it or re-run "
                             f"`foundation data convert`")
        page = struct.unpack_from("<I", head, 40)[0]
        if page < 512 or page & (page - 1) or size < 2 * page:
            raise ValueError(f"shard {path} is truncated or corrupted (page size {page}, {size} bytes); "
                             f"re-download it or re-run `foundation data convert`")
        fh.seek(page)
        second = fh.read(152)
    metas = [struct.unpack_from("<QQ", m, 136) for m in (head, second)
             if len(m) >= 152 and struct.unpack_from("<I", m, 16)[0] == _LMDB_MAGIC]
    last_pg, _ = max(metas, key=lambda m: m[1])
    if size < (last_pg + 1) * page:
        raise ValueError(f"shard {path} is truncated: {size} bytes, but its LMDB header needs "
                         f"{(last_pg + 1) * page}; re-download it or re-run `foundation data convert`")


class _OpenShards:
    """Process-wide cache of open read-only LMDB environments (LMDB allows one open per file per process).

    Keyed by (path, device, inode, size, mtime) as seen when the reader was created, so a file rewritten since
    is reopened; the least recently used are closed beyond ``max_open``. After a fork the
    inherited environments are closed in the child (they must not be used there) and reopened on demand.
    """

    def __init__(self, max_open: int = 256):
        self.max_open = max_open
        self.envs: OrderedDict[tuple, tuple] = OrderedDict()
        self.pid = os.getpid()

    def forget_inherited(self) -> None:
        for env, _ in self.envs.values():
            try:
                env.close()
            except lmdb.Error:
                pass
        self.envs.clear()
        self.pid = os.getpid()

    def txn(self, key: tuple, path: Path):
        if self.pid != os.getpid():
            self.forget_inherited()
        hit = self.envs.get(key)
        if hit is not None:
            self.envs.move_to_end(key)
            return hit[1]
        for stale in [k for k in self.envs if k[1:3] == key[1:3]]:  # same file, rewritten since it was opened
            self.close(stale)
        check_lmdb_file(path)
        try:
            env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
            txn = env.begin(buffers=False)
        except lmdb.Error as exc:
            raise ValueError(f"shard {path} cannot be opened as LMDB ({exc}); the file is truncated or "
                             f"corrupted: re-download it or re-run `foundation data convert`") from None
        self.envs[key] = (env, txn)
        while len(self.envs) > self.max_open:
            _, (old, _) = self.envs.popitem(last=False)
            old.close()
        return txn

    def close(self, key: tuple) -> None:
        hit = self.envs.pop(key, None)
        if hit is not None and self.pid == os.getpid():
            hit[0].close()


OPEN_SHARDS = _OpenShards()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=OPEN_SHARDS.forget_inherited)


class ShardReader:
    """Read-only access to one shard: ``len``, ``natoms`` (int32 array), ``metadata``, ``get(i)`` -> arrays.

    The LMDB environment is opened on first use in each process (checked with ``os.getpid()``) and shared by
    all readers of the same file in that process (``OPEN_SHARDS``), so a reader created in the parent process
    is safe to use in forked or spawned DataLoader workers. Not for concurrent use from several threads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            st = self.path.stat()
        except OSError:
            st = None
        if st is None or not self.path.is_file():
            raise FileNotFoundError(f"shard file {self.path} does not exist; check the dataset path "
                                    f"or re-run `foundation data convert`")
        self._key = (str(self.path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _open(self):
        return OPEN_SHARDS.txn(self._key, self.path)

    def close(self) -> None:
        """Close the environment (it is reopened on the next access)."""
        OPEN_SHARDS.close(self._key)

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
