"""Teacher labels cached as a foundation dataset (LMDB shards + manifest.json), reused across runs.

``build_label_cache(teacher, seeds, settings, cache_dir)`` makes the configurations (``configurations.py``),
labels them with the teacher (energy, forces, stress, ``hvp_vectors``/``hvp``) and writes
``cache_dir/labels-<key>/``, readable with ``ShardedDataset``. ``<key>`` is a SHA-256 of (teacher spec +
revision, the seeds' numbers/positions/cells, the configuration settings, the label settings and the format
versions): a second run with the same inputs finds the directory, verifies its checksums and returns it
without calling the teacher. ``label_frames`` does the same for a given list of frames (on-policy rounds),
keyed by the frames themselves.

Building is resumable and safe to run concurrently: work goes into ``labels-<key>.partial/`` under an
exclusive ``flock`` on ``labels-<key>.lock`` (a second process waits, then finds the finished cache); the
configurations are stored there first (float64, exact), then one labelled shard per ``shard_size`` frames,
each written under a temporary name and renamed when complete, so a killed run restarts at the first
missing shard. The finished directory also holds ``frames.json`` (per-frame ``config_type``, ``seed_index``,
``temperature_K``, ``md_step``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from ase import Atoms

from .. import __version__, keys
from ..data.encoding import RECORD_VERSION
from ..data.manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    fsync_dir,
    make_manifest,
    read_manifest,
    sha256_file,
    shard_entry,
    write_json_synced,
)
from ..data.shards import SHARD_SCHEMA_VERSION, ShardReader, ShardWriter
from ..data.stats import StatsAccumulator
from .structures import CONFIG_TYPES, ConfigurationSettings, generate_configurations
from .teacher import Teacher, structure_digest

CACHE_FORMAT_VERSION = 1
FRAMES_NAME = "frames.json"
_CONFIGS = "configurations.lmdb"
_INFO = ("config_type", "seed_index", "temperature_K", "md_step")
_LABELS = (keys.ENERGY, keys.FORCES, keys.STRESS, keys.HESSIAN_VECTORS, keys.HESSIAN_PRODUCTS)


def seeds_digest(seeds: Sequence[Atoms]) -> str:
    """Hex SHA-256 over the structures (numbers, float64 positions, cell, pbc) in order."""
    h = hashlib.sha256()
    for a in seeds:
        h.update(structure_digest(a).encode())
    return h.hexdigest()


def cache_key(teacher: Teacher, structures_digest: str, settings: dict | None, hvp_vectors: int, seed: int,
              stress: bool) -> str:
    """Hex SHA-256 identifying one cache entry (see module doc)."""
    blob = {"teacher": teacher.describe(), "structures": structures_digest, "settings": settings,
            "labels": {"hvp_vectors": int(hvp_vectors), "seed": int(seed), "stress": bool(stress)},
            "versions": [CACHE_FORMAT_VERSION, SHARD_SCHEMA_VERSION, RECORD_VERSION, MANIFEST_SCHEMA_VERSION]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def build_label_cache(teacher: Teacher, seeds: Sequence[Atoms], settings: ConfigurationSettings | None,
                      cache_dir: str | os.PathLike, *, hvp_vectors: int = 2, seed: int = 0, stress: bool = True,
                      shard_size: int = 256, r_max: float = 5.0, log: Callable[[str], None] | None = print) -> Path:
    """Configurations from ``seeds`` labelled by ``teacher``, cached; returns the dataset directory.

    ``hvp_vectors`` k random unit vectors per structure (seeded by ``seed``); ``r_max`` (Å) only sets the
    neighbour-count statistic of the manifest; ``log`` receives progress messages (None = silent).
    """
    settings = settings or ConfigurationSettings()
    key = cache_key(teacher, seeds_digest(seeds), settings.to_dict(), hvp_vectors, seed, stress)

    def make() -> list[Atoms]:
        return generate_configurations(seeds, teacher.calculator, settings, progress=log)
    return _cached(teacher, key, make, Path(cache_dir), hvp_vectors, seed, stress, shard_size, r_max, log,
                   {"seeds": len(seeds), "settings": settings.to_dict()})


def label_frames(teacher: Teacher, frames: Sequence[Atoms], cache_dir: str | os.PathLike, *, hvp_vectors: int = 2,
                 seed: int = 0, stress: bool = True, shard_size: int = 256, r_max: float = 5.0,
                 log: Callable[[str], None] | None = print, tolerate_failures: bool = False) -> Path:
    """``frames`` (e.g. on-policy picks) labelled by ``teacher`` into a cached dataset; returns its directory.

    ``tolerate_failures``: a frame whose labelling raises (or gives NaN/inf) is left out and recorded in the
    manifest's ``failed`` list ({"frame": index in ``frames``, "error": message}; ``skipped`` counts them) instead
    of stopping the run; when every frame fails, ``NoLabels`` (a ValueError carrying ``failures``) is raised. The
    failures are cached like labels: a resumed run does not call the teacher on them again."""
    if not frames:
        raise ValueError("label_frames: no frames given")
    frames = [_plain(a, a.info) for a in frames]
    key = cache_key(teacher, seeds_digest(frames), None, hvp_vectors, seed, stress)
    return _cached(teacher, key, lambda: frames, Path(cache_dir), hvp_vectors, seed, stress, shard_size, r_max,
                   log, {"frames": len(frames)}, tolerate_failures)


class NoLabels(ValueError):
    """Every frame of a ``label_frames(..., tolerate_failures=True)`` call failed; ``failures`` lists why."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        first = failures[0]["error"] if failures else "no frames"
        super().__init__(f"the labeller failed on all {len(failures)} frames (first error: {first})")


def _label_chunk(teacher: Teacher, chunk: Sequence[Atoms], k, seed, stress, tolerate: bool, offset: int):
    """(labelled frames, their labels, failures) of one chunk; without ``tolerate`` the teacher's error propagates."""
    if not tolerate:
        return list(chunk), teacher.label(chunk, hvp_vectors=k, seed=seed, stress=stress), []
    kept, labels, failed = [], [], []
    for i, atoms in enumerate(chunk):
        try:
            labels += teacher.label([atoms], hvp_vectors=k, seed=seed, stress=stress)
            kept.append(atoms)
        except Exception as exc:   # any labeller error (SCF not converged, NaN, ...): record it and go on
            failed.append({"frame": offset + i, "error": f"{type(exc).__name__}: {exc}"})
    return kept, labels, failed


def _plain(a: Atoms, info: dict) -> Atoms:
    out = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
    # plain Python values (frames read back from extxyz carry numpy scalars, which JSON cannot write)
    out.info.update({k: cast(info.get(k, d)) for k, d, cast in zip(_INFO, ("onpolicy", -1, 0.0, -1),
                                                                    (str, int, float, int))})
    return out


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_complete(directory: Path, key: str) -> bool:
    """True when ``directory`` is a finished cache entry for ``key`` whose shards match their checksums."""
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError):
        return False
    if manifest.get("provenance", {}).get("cache_key") != key:
        return False
    return all((directory / s["file"]).is_file() and sha256_file(directory / s["file"]) == s["sha256"]
               for s in manifest["shards"])


def _cached(teacher, key, make, cache_dir, k, seed, stress, shard_size, r_max, log, extra, tolerate=False) -> Path:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    final = cache_dir / f"labels-{key[:20]}"
    with _locked(cache_dir / f"labels-{key[:20]}.lock"):
        if is_complete(final, key):
            if log:
                log(f"teacher labels: reusing cache {final}")
            _refresh_statistics(final, teacher, r_max)
            return final
        if final.exists():
            shutil.rmtree(final)
        partial = cache_dir / f"labels-{key[:20]}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        frames = _configurations(partial, make, log)
        shards, failed = [], []
        for c, lo in enumerate(range(0, len(frames), shard_size)):
            chunk = frames[lo:lo + shard_size]
            path = partial / f"shard-{c:05d}.lmdb"
            if not _shard_done(path, len(chunk)):
                if log:
                    log(f"teacher labels: frames {lo}-{lo + len(chunk) - 1} of {len(frames)} ({teacher.name})")
                t0 = time.perf_counter()
                kept, labels, bad = _label_chunk(teacher, chunk, k, seed, stress, tolerate, lo)
                _write_shard(path, kept, labels, {"labelling_seconds": time.perf_counter() - t0, "failed": bad})
            reader = ShardReader(path)
            failed += reader.metadata.get("failed", [])
            if len(reader):
                shards.append(path)
            reader.close()
        if not shards:
            raise NoLabels(failed)
        manifest = _manifest(shards, teacher, key, r_max, {**extra, "hvp_vectors": k, "label_seed": seed},
                             failed)
        write_json_synced(partial / FRAMES_NAME, {n: [a.info[n] for a in frames] for n in _INFO})
        write_json_synced(partial / MANIFEST_NAME, manifest)
        (partial / _CONFIGS).unlink()
        fsync_dir(partial)
        os.rename(partial, final)
        fsync_dir(cache_dir)
    return final


def _refresh_statistics(directory: Path, teacher: Teacher, r_max: float) -> None:
    """Recompute the manifest statistics (no teacher calls) when they were made for another ``r_max``."""
    manifest = read_manifest(directory)
    if manifest["statistics"].get("r_max") == r_max:
        return
    shards = [directory / s["file"] for s in manifest["shards"]]
    prov = manifest["provenance"]
    fresh = _manifest(shards, teacher, prov["cache_key"], r_max, prov["arguments"], manifest.get("failed"))
    fresh["provenance"]["created"] = prov["created"]
    tmp = directory / (MANIFEST_NAME + ".tmp")
    write_json_synced(tmp, fresh)
    os.replace(tmp, directory / MANIFEST_NAME)


def _configurations(partial: Path, make, log) -> list[Atoms]:
    """The configurations, stored once in ``partial`` (exact float64) so a resumed run does not redo MD."""
    path = partial / _CONFIGS
    if _shard_done(path, None):
        reader = ShardReader(path)
        frames = []
        for i in range(len(reader)):
            r = reader.get(i)
            a = Atoms(numbers=r[keys.ATOMIC_NUMBERS], positions=r[keys.POSITIONS], cell=r[keys.CELL],
                      pbc=r[keys.PBC])
            a.info.update(config_type=CONFIG_TYPES[int(r["config_type"])], seed_index=int(r["seed_index"]),
                          temperature_K=float(r["temperature_K"]), md_step=int(r["md_step"]))
            frames.append(a)
        reader.close()
        if log:
            log(f"teacher labels: resuming with {len(frames)} stored configurations in {partial}")
        return frames
    frames = make()
    if not frames:
        raise ValueError("no configurations were generated; enable seeds, copies or MD in the settings")
    for stale in partial.glob("*.lmdb*"):
        stale.unlink()
    tmp = path.with_name(path.name + ".tmp")
    with ShardWriter(tmp) as writer:
        for a in frames:
            writer.append({keys.ATOMIC_NUMBERS: a.numbers.astype(np.uint8), keys.POSITIONS: a.positions,
                           keys.CELL: a.cell.array, keys.PBC: a.pbc,
                           "config_type": np.int64(CONFIG_TYPES.index(a.info["config_type"])),
                           "seed_index": np.int64(a.info["seed_index"]),
                           "temperature_K": np.float64(a.info["temperature_K"]),
                           "md_step": np.int64(a.info["md_step"])})
        writer.close(list(_INFO))
    os.rename(tmp, path)
    return frames


def _shard_done(path: Path, count: int | None) -> bool:
    """Whether ``path`` is a complete shard of ``count`` frames (labelled ones + recorded failures)."""
    if not path.is_file():
        return False
    try:
        reader = ShardReader(path)
        n = len(reader) + len(reader.metadata.get("failed", []))
        reader.close()
    except ValueError:
        return False
    return count is None or n == count


def _write_shard(path: Path, frames: Sequence[Atoms], labels: Sequence[dict], extra: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    present = sorted({k for rec in labels for k in rec})
    with ShardWriter(tmp) as writer:
        for a, rec in zip(frames, labels):
            fields = {keys.ATOMIC_NUMBERS: a.numbers.astype(np.uint8), keys.POSITIONS: a.positions.astype(np.float64),
                      keys.CELL: a.cell.array.astype(np.float64), keys.PBC: a.pbc.astype(bool)}
            fields.update({name: np.asarray(rec[name], np.float64) for name in _LABELS if name in rec})
            writer.append(fields)
        writer.close(present, extra)
    os.rename(tmp, path)


def _manifest(shards: list[Path], teacher: Teacher, key: str, r_max: float, arguments: dict,
              failed: list | None = None) -> dict:
    """A manifest (``foundation.data.manifest`` schema) for the labelled shards, statistics recomputed."""
    stats, entries, natoms, elements, props = StatsAccumulator(r_max), [], [], set(), set()
    for path in shards:
        reader = ShardReader(path)
        meta = reader.metadata
        for i in range(len(reader)):
            r = reader.get(i)
            labels = {k: r[k] for k in _LABELS if k in r}
            stats.update_structure(r[keys.ATOMIC_NUMBERS], r[keys.POSITIONS], r[keys.CELL], r[keys.PBC], labels)
        reader.close()
        natoms.extend(reader.natoms.tolist())
        elements.update(meta["elements"])
        props.update(meta["properties"])
        entries.append(shard_entry(path, meta, labelling_seconds=meta.get("labelling_seconds")))
    desc = teacher.describe()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return make_manifest(name=f"distill-{key[:12]}", level_of_theory=f"teacher {desc['name']} ({desc['revision']})",
                         statistics=stats.result(), shards=entries, natoms=(min(natoms), max(natoms)),
                         elements=elements, properties=props,
                         provenance={"tool": f"foundation {__version__}", "created": created, "teacher": desc,
                                     "cache_key": key, "arguments": arguments},
                         skipped=len(failed or []), failed=list(failed or []))
