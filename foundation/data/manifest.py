"""``manifest.json``: what a converted dataset contains, its statistics, checksums and provenance.

Top-level keys (schema version ``MANIFEST_SCHEMA_VERSION``)::

    format, schema_version, name, level_of_theory, num_structures, num_atoms,
    natoms {min, max, mean}, elements [symbols], properties {name: {unit, per_atom, count}} (count: structures
    holding the label; a label some structures lack is missing there, and the loss skips it),
    shards [{file, count, num_atoms, bytes, sha256}], statistics (stats.StatsAccumulator.result()),
    skipped (records left out by --skip-invalid), files (every file convert wrote into the folder, so that a
    later conversion replaces exactly these), provenance {tool, created, arguments, inputs [{file, bytes, sha256}],
    fingerprint}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "foundation-dataset"
MANIFEST_SCHEMA_VERSION = 1
REQUIRED_KEYS = ("format", "schema_version", "num_structures", "shards", "properties", "elements")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_synced(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON and fsync the file."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def shard_entry(path: str | os.PathLike, meta: dict, **extra) -> dict:
    """The manifest's ``shards`` entry of a closed shard file (``meta`` = its ``ShardWriter.close`` metadata)."""
    path = Path(path)
    return {"file": path.name, "count": meta["count"], "num_atoms": meta["num_atoms"],
            "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}


def make_manifest(*, name: str | None, level_of_theory: str | None, statistics: dict, shards: list[dict],
                  natoms: tuple[int, int], elements, properties, skipped: int = 0, **extra) -> dict:
    """A manifest dict (schema above) from its parts: ``statistics`` = ``StatsAccumulator.result()``, ``natoms`` =
    (min, max) atoms per structure, ``elements`` atomic numbers, ``properties`` label names or {name: number of
    structures holding it}; ``extra`` (e.g.
    ``provenance``) is appended."""
    from ase.data import chemical_symbols

    from .. import keys
    n = statistics["num_structures"]
    return {"format": MANIFEST_FORMAT, "schema_version": MANIFEST_SCHEMA_VERSION, "name": name,
            "level_of_theory": level_of_theory, "num_structures": n, "num_atoms": statistics["num_atoms"],
            "natoms": {"min": natoms[0], "max": natoms[1], "mean": statistics["num_atoms"] / n},
            "elements": [chemical_symbols[z] for z in sorted(elements)],
            "properties": {k: {"unit": keys.UNITS.get(k), "per_atom": k in keys.PER_ATOM_KEYS,
                               **({"count": int(properties[k])} if isinstance(properties, dict) else {})}
                           for k in sorted(properties)},
            "units": {"positions": "Å", "cell": "Å"}, "shards": shards, "statistics": statistics,
            "skipped": skipped, **extra}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The validated manifest of a dataset directory (``FileNotFoundError``/``ValueError`` say what is wrong)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {directory} is not a converted dataset "
                                f"(create one with `foundation data convert INPUT... --out {directory}`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run `foundation data convert`") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a foundation manifest (missing {missing}, format "
                         f"{manifest.get('format')!r}); re-run `foundation data convert`")
    if manifest["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {manifest['schema_version']} is not supported (this code reads "
                         f"{MANIFEST_SCHEMA_VERSION}); upgrade foundation or re-convert the dataset")
    total = sum(int(s["count"]) for s in manifest["shards"])
    if total != manifest["num_structures"]:
        raise ValueError(f"{path}: shards hold {total} structures but num_structures is "
                         f"{manifest['num_structures']}; the manifest is inconsistent: re-convert the dataset")
    return manifest


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so renames/creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
