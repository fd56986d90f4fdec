"""``foundation data inspect``: a readable summary of a converted dataset; ``verify`` re-checks every byte."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import keys
from .manifest import MANIFEST_NAME, read_manifest, sha256_file
from .shards import ShardReader


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> list[str]:
    rows = [header, *rows] if header else rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def summarize(manifest: dict) -> str:
    """The manifest as text: overview, properties, statistics, reference energies, shards, provenance."""
    stats = manifest.get("statistics") or {}
    prov = manifest.get("provenance") or {}
    nat = manifest.get("natoms") or {}
    out = [f"dataset {manifest.get('name')!r} (schema {manifest['schema_version']})"]
    out += _table([
        ("structures", _fmt(manifest["num_structures"])), ("atoms", _fmt(manifest.get("num_atoms"))),
        ("atoms/structure", f"min {_fmt(nat.get('min'))}  mean {_fmt(nat.get('mean'))}  max {_fmt(nat.get('max'))}"),
        ("elements", " ".join(manifest["elements"])), ("level of theory", _fmt(manifest.get("level_of_theory"))),
        ("skipped records", _fmt(manifest.get("skipped"))),
    ])
    out += ["", "properties"]
    out += _table([(k, _fmt(v.get("unit")), "per atom" if v.get("per_atom") else "per structure",
                    _fmt(v.get("count")))
                   for k, v in manifest["properties"].items()], ("name", "unit", "kind", "structures"))
    out += ["", "statistics"]
    out += _table([
        ("r_max (Å)", _fmt(stats.get("r_max"))), ("mean neighbors at r_max", _fmt(stats.get("avg_num_neighbors"))),
        ("force RMS (eV/Å)", _fmt(stats.get("force_rms"))),
        ("energy/atom after E0: mean (eV)", _fmt(stats.get("energy_per_atom_mean"))),
        ("energy/atom after E0: std (eV)", _fmt(stats.get("energy_per_atom_std"))),
        ("E0 fit: rank / RMSE per structure (eV)",
         f"{_fmt(stats.get('e0_rank'))} / {_fmt(stats.get('e0_fit_rmse_per_structure'))}"),
    ])
    refs = stats.get("reference_energies") or {}
    if refs:
        out += ["", "reference energies (eV)"]
        out += _table([(k, f"{v:.6f}") for k, v in refs.items()], ("element", "E0"))
    out += ["", "shards"]
    out += _table([(s["file"], str(s["count"]), _fmt(s.get("num_atoms")), _fmt(s.get("bytes")), s["sha256"][:16])
                   for s in manifest["shards"]], ("file", "structures", "atoms", "bytes", "sha256"))
    total = sum(int(s.get("bytes", 0)) for s in manifest["shards"])
    if manifest.get("num_atoms"):
        out.append(f"{total} bytes on disk, {total / manifest['num_atoms']:.1f} bytes/atom")
    if prov:
        out += ["", f"created {prov.get('created')} by {prov.get('tool')}"]
        out += [f"  input {i['file']} sha256 {i['sha256'][:16]} ({i['bytes']} bytes)" for i in prov.get("inputs", [])]
        out.append(f"  arguments {prov.get('arguments')}")
    return "\n".join(out)


def verify_dataset(directory: str | os.PathLike, manifest: dict, progress: bool = True) -> str:
    """Recompute every shard checksum and decode every record; ``ValueError`` naming the file/record on failure."""
    directory = Path(directory)
    bar = tqdm(total=manifest["num_structures"], desc="verify", unit=" structures",
               disable=None if progress else True)
    records = 0
    n = manifest["num_structures"]  # labels not counted, or counted on every structure, must be in every record
    everywhere = [k for k, v in manifest["properties"].items() if v.get("count", n) == n]
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {directory / MANIFEST_NAME} is missing; "
                                    f"re-download the dataset or re-run `foundation data convert`")
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ValueError(f"shard {path}: sha256 {digest[:16]}... does not match the manifest "
                             f"({shard['sha256'][:16]}...); the file is corrupted or was replaced: re-download it "
                             f"or re-run `foundation data convert`")
        reader = ShardReader(path)
        natoms = reader.natoms
        if len(reader) != shard["count"] or len(natoms) != shard["count"]:
            raise ValueError(f"shard {path} holds {len(natoms)} structures, the manifest says {shard['count']}; "
                             f"re-convert the dataset")
        for i in range(shard["count"]):
            rec = reader.get(i)
            n = len(rec.get(keys.ATOMIC_NUMBERS, ()))
            if n != natoms[i] or rec[keys.POSITIONS].shape != (n, 3):
                raise ValueError(f"shard {path}, record {i}: {n} atoms but the shard index says {natoms[i]}; "
                                 f"the shard is corrupted: re-convert it")
            periodic = bool(np.all(rec[keys.PBC]))  # stress exists only for fully periodic structures
            missing = [k for k in everywhere if k not in rec and (k != keys.STRESS or periodic)]
            if missing:
                raise ValueError(f"shard {path}, record {i}: missing properties {missing} listed in the manifest; "
                                 f"re-convert the dataset")
            bad = [k for k in manifest["properties"] if k in rec and not np.all(np.isfinite(rec[k]))]
            if bad:
                raise ValueError(f"shard {path}, record {i}: NaN/inf in {bad}; re-convert the dataset")
            bar.update(1)
            records += 1
        reader.close()
    bar.close()
    return f"verified: {len(manifest['shards'])} shards, {records} records, checksums match, every record decodes"


def inspect(path: str | os.PathLike, verify: bool = False) -> str:
    """The summary of the dataset at ``path`` (a directory with manifest.json); with ``verify`` a full check."""
    manifest = read_manifest(path)
    text = summarize(manifest)
    if verify:
        text += "\n\n" + verify_dataset(path, manifest)
    return text

