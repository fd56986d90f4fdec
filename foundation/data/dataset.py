"""``ShardedDataset``: a map-style dataset over all shards of one or more converted datasets.

Index memory is one int32 per structure (``natoms``) plus one offset per shard, so a 10^8-structure corpus
opens on one machine. LMDB environments are opened lazily in each process (safe with forked or spawned
DataLoader workers); at most ``shards.OPEN_SHARDS.max_open`` stay open per process.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from .. import keys
from .graph import build_graph
from .manifest import MANIFEST_NAME, read_manifest
from .shards import ShardReader
from .stats import statistics_from_manifest

_STRUCTURE_FIELDS = (keys.ATOMIC_NUMBERS, keys.POSITIONS, keys.CELL, keys.PBC)


def _resolve(sources) -> tuple[list[Path], list[int | None], list[dict]]:
    """Shard files, their expected counts (None if unknown) and the manifests of the dataset dirs given."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files, counts, manifests = [], [], []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            manifest = read_manifest(src)
            manifests.append(manifest)
            for shard in manifest["shards"]:
                f = src / shard["file"]
                if not f.is_file():
                    raise FileNotFoundError(f"shard {f} listed in {src / MANIFEST_NAME} is missing; re-download "
                                            f"the dataset or re-run `foundation data convert`")
                if "bytes" in shard and f.stat().st_size != shard["bytes"]:
                    raise ValueError(f"shard {f} is {f.stat().st_size} bytes but {src / MANIFEST_NAME} says "
                                     f"{shard['bytes']} (truncated or replaced); re-download or re-convert it")
                files.append(f)
                counts.append(int(shard["count"]))
        elif src.is_file():
            files.append(src)
            counts.append(None)
        else:
            raise FileNotFoundError(f"{src} is neither a dataset directory (with {MANIFEST_NAME}) nor a shard file")
    if not files:
        raise ValueError(f"no shards found in {[str(s) for s in sources]}")
    return files, counts, manifests


class ShardedDataset(Dataset):
    """Structures of converted datasets as PyG ``Data`` (fields of ``foundation.keys``), labels included.

    source: a dataset directory (with manifest.json), a shard file, or a list of those.
    r_max: cutoff (Å) of the neighbor list (``edge_index`` (2,E), ``shifts`` (E,3) Å); None = no edges.
    dtype: float dtype of positions, cell and shifts (default: torch default dtype; labels are always float64, as
    stored); head, dataset_index: stored on items.
    Attributes: ``natoms`` (N,) int32 atoms per structure, ``manifest`` (dict, or None unless exactly one
    directory was given), ``reference_energies`` ({Z: eV} or None), ``statistics`` (see stats.py).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], r_max: float | None = None,
                 dtype: torch.dtype | None = None, head: int = 0, dataset_index: int = 0, check_crc: bool = True):
        files, counts, manifests = _resolve(source)
        self.r_max, self.dtype, self.head, self.dataset_index = r_max, dtype, int(head), int(dataset_index)
        self.check_crc = check_crc
        self.manifests = manifests
        self.manifest = manifests[0] if len(manifests) == 1 and len(files) == len(manifests[0]["shards"]) else None
        self._readers = [ShardReader(f) for f in files]
        natoms = []
        for reader, count in zip(self._readers, counts):
            n = reader.natoms
            if count is not None and len(n) != count:
                raise ValueError(f"shard {reader.path} holds {len(n)} structures but the manifest says {count}; "
                                 f"the dataset is inconsistent: re-download or re-convert it")
            natoms.append(n)
            reader.close()
        self.natoms = np.concatenate(natoms).astype(np.int32)
        self._offsets = np.zeros(len(files) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in natoms], out=self._offsets[1:])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shard_offsets(self) -> np.ndarray:
        """(S+1,) int64: structures of shard s are indices [offsets[s], offsets[s+1])."""
        return self._offsets

    @property
    def reference_energies(self) -> dict[int, float] | None:
        """Per-element reference energies {Z: eV} from the manifest, or None."""
        if self.manifest is None:
            return None
        return statistics_from_manifest(self.manifest)["e0s"] or None

    @property
    def statistics(self) -> dict | None:
        """Training statistics of the manifest (``stats.statistics_from_manifest``), or None."""
        return statistics_from_manifest(self.manifest) if self.manifest else None

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, record within the shard) of a global index."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} structures")
        index = int(index) % n
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def record(self, index: int) -> dict[str, np.ndarray]:
        """The stored arrays of structure ``index`` (float64 positions and labels exactly as converted)."""
        shard, local = self.locate(index)
        rec = self._readers[shard].get(local, check_crc=self.check_crc)
        missing = [k for k in _STRUCTURE_FIELDS if k not in rec]
        if missing or len(rec[keys.ATOMIC_NUMBERS]) != self.natoms[index]:
            raise ValueError(f"shard {self._readers[shard].path}, record {local}: missing fields {missing} or atom "
                             f"count differs from the shard index; the shard is corrupted: re-convert it")
        return rec

    def __getitem__(self, index: int) -> Data:
        rec = self.record(index)
        numbers, pos, cell, pbc = (rec.pop(k) for k in _STRUCTURE_FIELDS)
        return build_graph(numbers, pos, cell, pbc, self.r_max, rec, head=self.head,
                           dataset_index=self.dataset_index, dtype=self.dtype)

    def close(self) -> None:
        """Close every shard of this dataset (they reopen on the next access)."""
        for reader in self._readers:
            reader.close()
