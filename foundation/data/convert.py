"""``foundation data convert``: input files -> LMDB shards + ``manifest.json``, streamed, atomic, idempotent.

Labels are stored per record: each record keeps every label it has (a label some records lack is missing only
there; training masks it) and the manifest counts the records holding each label. Labels named with ``key_map``
(``--energy-key`` ...) are required: a record without one is invalid ("missing required label"). ``total_charge``
is always stored (default 0 e). Stress is defined only for structures periodic along all three lattice vectors:
it is never stored for other structures, nor required of them.

Invalid records (NaN/inf values, a missing required label, an unknown element, two atoms closer than
``MIN_DISTANCE`` Å, unparsable frames) stop the conversion with a ``ValueError`` naming the file and record
index; with ``skip_invalid=True`` they are left out and listed in ``skipped.json`` (file, record, reason).

The dataset is written into ``<out>.tmp-<host>-<pid>-<start>-XXXX`` next to ``out``, fsynced and renamed into
place; an existing dataset at ``out`` is renamed away first and, once the new one is in, the files it lists as
written by convert are deleted. An ``out`` holding anything else, or an input inside ``out``, is refused before
anything is written. On any error the temporary directory is removed, so ``out`` is either the old dataset, the
new one, or absent - never half written; a full disk is a one-line ``ValueError`` naming the folder. Temporary
folders of a killed conversion are removed by the next conversion into the same ``out`` once their writer is gone
(``outdir``). Re-running with the same inputs (by SHA-256) and arguments finds the dataset up to date and leaves
it untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import __version__, keys
from .encoding import RECORD_VERSION
from .graph import MIN_DISTANCE, check_min_distance, neighbor_list
from .labels import DEFAULT_SOURCES, read_labels
from .manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    fsync_dir,
    make_manifest,
    read_manifest,
    sha256_file,
    shard_entry,
    write_json_synced,
)
from .outdir import (
    SKIPPED_NAME,
    check_inputs_outside,
    check_replaceable,
    clean_orphans,
    make_temp_dir,
    old_dir_name,
    remove_written,
)
from .readers import iter_structures
from .shards import SHARD_SCHEMA_VERSION, ShardWriter
from .stats import MAX_Z, StatsAccumulator


class InvalidRecord(ValueError):
    """One input record that cannot be stored; the message says why."""


def convert(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, shard_size: int = 10000,
            dataset_name: str | None = None, key_map: Mapping[str, str] | None = None, skip_invalid: bool = False,
            r_max: float = 5.0, level_of_theory: str | None = None, progress: bool = True) -> Path:
    """Convert ``inputs`` into a sharded dataset at ``out``; returns the dataset directory.

    ``shard_size`` structures per shard; ``key_map`` {"energy"|"forces"|"stress"|"charges": name in the input};
    ``r_max`` (Å) is the cutoff of the mean-neighbor-count statistic. See the module docstring for the rules on
    required labels, invalid records, atomicity and idempotency.
    """
    out = Path(out)
    key_map = {k: v for k, v in dict(key_map or {}).items() if v}
    _check_arguments(inputs, shard_size, key_map, r_max)
    paths = [Path(p) for p in inputs]
    arguments = {"shard_size": int(shard_size), "dataset_name": dataset_name or out.name, "key_map": key_map,
                 "skip_invalid": bool(skip_invalid), "r_max": float(r_max), "level_of_theory": level_of_theory}
    sources = [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths]
    fingerprint = _fingerprint(sources, arguments)
    check_inputs_outside(out, paths)
    for line in clean_orphans(out):
        if progress:
            print(line)
    if _up_to_date(out, fingerprint):
        if progress:
            print(f"{out} is up to date (same inputs and arguments); nothing to do")
        return out
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        manifest = _write_dataset(paths, tmp, arguments, progress)
        manifest["provenance"] = {"tool": f"foundation {__version__}", "created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "arguments": arguments, "inputs": sources,
            "fingerprint": fingerprint}
        write_json_synced(tmp / MANIFEST_NAME, manifest)
        fsync_dir(tmp)
        _swap_in(tmp, out)
    except BaseException as exc:
        error = _write_error(exc, tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise
    return out


def _write_error(exc: BaseException, tmp: Path, out: Path) -> ValueError | None:
    """A one-line error for a failed write (disk full, I/O error) naming the folder and the fix, else None.

    LMDB reports a full disk as "Input/output error": the free space of the file system decides."""
    import lmdb
    if not isinstance(exc, (OSError, lmdb.Error)) or isinstance(exc, FileNotFoundError):
        return None
    try:
        st = os.statvfs(tmp.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 << 20)
    what = (f"no space left on the file system of {tmp.parent} ({free if free is not None else '?'} bytes free)"
            if full else f"could not write into {tmp.parent}")
    return ValueError(f"{what} while writing the dataset for {out} ({type(exc).__name__}: {exc}); "
                      f"{'free space' if full else 'check the disk'} or choose another --out. Nothing was changed "
                      f"at {out}")


def _check_arguments(inputs, shard_size, key_map, r_max) -> None:
    if not inputs:
        raise ValueError("no input files given; pass one or more extxyz/ASE db/.aselmdb/OUTCAR files")
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"input {p} does not exist or is not a file; check the path")
    if int(shard_size) < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not float(r_max) > MIN_DISTANCE:
        raise ValueError(f"--r-max must be > {MIN_DISTANCE} Å, got {r_max}")
    unknown = sorted(set(key_map) - set(DEFAULT_SOURCES))
    if unknown:
        raise ValueError(f"key_map has unknown label names {unknown}; use {sorted(DEFAULT_SOURCES)}")


def _fingerprint(sources: list[dict], arguments: dict) -> str:
    blob = json.dumps({"inputs": [(s["file"], s["sha256"]) for s in sources], "arguments": arguments,
                       "versions": [MANIFEST_SCHEMA_VERSION, SHARD_SCHEMA_VERSION, RECORD_VERSION, __version__]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> bool:
    """True when ``out`` is a complete dataset made from the same inputs and arguments (checksums verified)."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):
        return False
    if manifest.get("provenance", {}).get("fingerprint") != fingerprint:
        return False
    for shard in manifest["shards"]:
        f = out / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"] or sha256_file(f) != shard["sha256"]:
            return False
    return True


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed away first, and once the new one is in, the files
    the previous conversion wrote are deleted (``check_replaceable`` made sure there is nothing else)."""
    if out.exists():
        old = old_dir_name(out)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        fsync_dir(out.parent)
        remove_written(old)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


class _State:
    """Everything accumulated while streaming records into shards."""

    def __init__(self, directory: Path, shard_size: int, r_max: float, key_map: Mapping[str, str]):
        self.directory, self.shard_size = directory, shard_size
        self.required = sorted(set(key_map) - {keys.STRESS})   # labels named with key_map: every record has them
        self.stress_required = keys.STRESS in key_map          # ... stress only where defined (fully periodic)
        self.counts: dict[str, int] = {}                       # records holding each label
        self.shard_labels: set[str] = set()
        self.writer: ShardWriter | None = None
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self.stats = StatsAccumulator(r_max)
        self.natoms_min, self.natoms_max, self.elements = None, 0, set()

    def add(self, fields: dict[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> None:
        if self.writer is None:
            self.writer = ShardWriter(self.directory / f"shard-{len(self.shards):05d}.lmdb")
        self.writer.append(fields)
        for name in labels:
            self.counts[name] = self.counts.get(name, 0) + 1
        self.shard_labels.update(labels)
        n = len(fields[keys.ATOMIC_NUMBERS])
        self.natoms_min = n if self.natoms_min is None else min(self.natoms_min, n)
        self.natoms_max = max(self.natoms_max, n)
        if len(self.writer.natoms) >= self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        if self.writer is None:
            return
        meta = self.writer.close(sorted(self.shard_labels))
        path = self.writer.path
        self.writer, self.shard_labels = None, set()
        self.elements.update(meta["elements"])
        self.shards.append(shard_entry(path, meta))


def _write_dataset(paths: list[Path], directory: Path, arguments: dict, progress: bool) -> dict:
    state = _State(directory, arguments["shard_size"], arguments["r_max"], arguments["key_map"])
    try:
        for path in paths:
            bar = tqdm(desc=f"convert {path.name}", unit=" structures", disable=None if progress else True)
            for index, item in iter_structures(path):
                bar.update(1)
                try:
                    if isinstance(item, Exception):
                        raise InvalidRecord(str(item))
                    fields, labels, edges = _prepare(item, arguments["key_map"], state, arguments["r_max"])
                except InvalidRecord as exc:
                    _invalid(path, index, str(exc), arguments["skip_invalid"], state)
                    continue
                state.add(fields, labels)
                state.stats.update(fields[keys.ATOMIC_NUMBERS], labels, edges)
            bar.close()
        state.close_shard()
    finally:
        if state.writer is not None:
            state.writer.abort()
    if not state.shards:
        raise ValueError(f"no valid structures in {[str(p) for p in paths]} ({len(state.skipped)} skipped); "
                         f"nothing to write")
    if arguments["skip_invalid"]:
        write_json_synced(directory / SKIPPED_NAME, state.skipped)
    return _manifest(state, arguments)


def _invalid(path: Path, index: int, reason: str, skip: bool, state: _State) -> None:
    if not skip:
        raise ValueError(f"{path}, record {index}: {reason}. Fix or remove this record, or pass --skip-invalid "
                         f"to leave bad records out (they are listed in {SKIPPED_NAME})")
    state.skipped.append({"file": str(path), "record": index, "reason": reason})


def _prepare(atoms, key_map: Mapping[str, str], state: _State, r_max: float):
    """Validate one Atoms; returns (record fields, labels, edge count at r_max) or raises ``InvalidRecord``."""
    numbers = np.asarray(atoms.numbers)
    if len(numbers) == 0:
        raise InvalidRecord("structure has no atoms")
    bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
    if len(bad):
        raise InvalidRecord(f"unknown element (atomic number {int(bad[0])})")
    positions = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    for name, value in (("positions", positions), ("cell", cell)):
        if not np.all(np.isfinite(value)):
            raise InvalidRecord(f"{name} contain NaN or inf")
    periodic = bool(pbc.all())
    if not periodic:  # stress is undefined without three periodic directions
        key_map = {k: v for k, v in key_map.items() if k != keys.STRESS}
    try:
        labels = read_labels(atoms, key_map)
    except KeyError as exc:
        raise InvalidRecord(f"missing required label: {exc.args[0]}") from None
    except ValueError as exc:
        raise InvalidRecord(f"bad label: {exc}") from None
    need = state.required + ([keys.STRESS] if periodic and state.stress_required else [])
    missing = [k for k in need if k not in labels]
    if missing:
        raise InvalidRecord(f"missing required label(s) {missing} (named with --*-key: {need})")
    labels = {k: v for k, v in labels.items() if periodic or k != keys.STRESS}
    for name, value in labels.items():
        if not np.all(np.isfinite(value)):
            raise InvalidRecord(f"label {name!r} contains NaN or inf")
    try:
        edge_index, unit = neighbor_list(positions, cell, pbc, r_max)
    except ValueError as exc:
        raise InvalidRecord(str(exc)) from None
    try:
        check_min_distance(positions, cell, edge_index, unit)
    except ValueError as exc:
        raise InvalidRecord(str(exc)) from None
    fields = {keys.ATOMIC_NUMBERS: numbers.astype(np.uint8), keys.POSITIONS: positions, keys.CELL: cell,
              keys.PBC: pbc}
    fields.update(labels)
    return fields, labels, edge_index.shape[1]


def _manifest(state: _State, arguments: dict) -> dict:
    files = [s["file"] for s in state.shards] + ([SKIPPED_NAME] if arguments["skip_invalid"] else [])
    return make_manifest(name=arguments["dataset_name"], level_of_theory=arguments["level_of_theory"],
                         statistics=state.stats.result(), shards=state.shards,
                         natoms=(state.natoms_min, state.natoms_max), elements=state.elements,
                         properties=state.counts, skipped=len(state.skipped), files=files + [MANIFEST_NAME])
