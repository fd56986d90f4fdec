"""Fine-tuning data: inputs as LMDB datasets (files converted on the fly, ``FILE@INDEX`` frame selections), replay
samples, and the ``TrainConfig.data`` section laid out so that training dataset k feeds head k."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .. import keys
from .config import FinetuneConfig


def configure_data(config: FinetuneConfig, data_heads: list[str], cache: Path, r_max: float) -> None:
    """Rewrite ``config.data`` in place: converted paths, one head per dataset (new data -> ``data_heads[0]``,
    replay data -> ``data_heads[1]``), mixing weights (1 - w : w), validation on the new data only."""
    c = t = config
    train_paths = prepare_paths(t.data.train, cache, r_max)
    if not train_paths:
        raise ValueError("data.train is empty; give the new data (dataset directories or ASE-readable files)")
    t.data.valid = prepare_paths(t.data.valid, cache, r_max)
    t.data.train, t.data.heads = train_paths, [data_heads[0]] * len(train_paths)
    if c.finetune.strategy == "replay":
        replay = [sample_dataset(p, c.replay.samples, t.seed, cache, r_max)
                  for p in prepare_paths(c.replay.data, cache, r_max)]
        t.data.train = train_paths + replay
        t.data.heads = t.data.heads + [data_heads[1]] * len(replay)
        new_w, old_w = (1 - c.replay.weight) / len(train_paths), c.replay.weight / len(replay)
        t.data.weights = [new_w] * len(train_paths) + [old_w] * len(replay)
        if t.data.valid:   # valid k follows train k: new-data validation only on the target head
            t.data.valid = t.data.valid[:len(train_paths)]


def prepare_paths(paths: list[str], cache_dir: Path, r_max: float) -> list[str]:
    """Dataset directories (and .lmdb shard files) as they are; other files (ASE-readable) converted to shards in
    ``cache_dir`` (idempotent: an unchanged file is not converted again). ``FILE@INDEX`` takes the frames
    ``ase.io.read(FILE, INDEX)`` selects (e.g. ``aspirin.xyz@:1000:20`` = 50 frames spread over the trajectory)."""
    out = []
    for entry in map(str, paths):
        file, _, index = entry.partition("@") if "@" in entry and not Path(entry).exists() else (entry, "", "")
        p = Path(file)
        if not p.exists():
            raise FileNotFoundError(f"fine-tuning data {str(p)!r} not found; give an LMDB dataset directory "
                                    "('foundation data convert') or an ASE-readable file (extxyz, ASE db ...)")
        if p.is_dir() or p.suffix in (".lmdb", ".mdb"):
            if index:
                raise ValueError(f"{entry!r}: @INDEX selects frames of a file, not of a dataset directory")
            out.append(str(p))
            continue
        from ..data.convert import convert
        tag = hashlib.sha256(f"{p.resolve()}@{index}".encode()).hexdigest()[:8]
        name = p.stem + (f"-{index.replace(':', '_')}" if index else "")
        source = _select_frames(p, index, cache_dir / f"{name}-{tag}.db") if index else p
        out.append(str(convert([source], cache_dir / f"{name}-{tag}", r_max=r_max, dataset_name=name,
                               progress=False)))
    return out


def _select_frames(path: Path, index: str, target: Path) -> Path:
    """Frames ``ase.io.read(path, index)`` written to an ASE db ``target`` (exact floats); re-used if present."""
    from ase.db import connect

    from ..data.readers import read_atoms
    if target.is_file():
        return target
    try:
        frames = read_atoms(path, index)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"cannot select frames {index!r} of {path}: {exc}; use Python slice syntax, e.g. :100 "
                         "or ::10") from exc
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path}@{index} selects no frames")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.db")
    tmp.unlink(missing_ok=True)
    with connect(tmp, use_lock_file=False) as db:
        for atoms in frames:
            db.write(atoms, total_charge=float(atoms.info.get("total_charge", atoms.info.get("charge", 0.0))))
    tmp.rename(target)
    return target


def sample_dataset(path: str, samples: int, seed: int, cache_dir: Path, r_max: float) -> str:
    """A seeded sample of ``samples`` structures of the dataset at ``path``, written as a dataset in ``cache_dir``
    (exact float64 labels through an ASE db); ``path`` itself when ``samples`` is 0 or covers it all."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect
    from ase.stress import full_3x3_to_voigt_6_stress

    from ..data import ShardedDataset
    from ..data.convert import convert
    ds = ShardedDataset(path)
    if samples == 0 or samples >= len(ds):
        return path
    name = ((ds.manifest or {}).get("name") or Path(path).name) + f"-replay{samples}-s{seed}"
    out = cache_dir / name
    if (out / "manifest.json").is_file():
        return str(out)
    picks = np.sort(np.random.default_rng([seed, 11]).choice(len(ds), samples, replace=False))
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = cache_dir / f"{name}.db"
    source.unlink(missing_ok=True)
    with connect(source, use_lock_file=False) as db:
        for i in picks:
            rec = ds.record(int(i))
            atoms = Atoms(numbers=rec[keys.ATOMIC_NUMBERS].astype(int), positions=rec[keys.POSITIONS],
                          cell=rec[keys.CELL].reshape(3, 3), pbc=rec[keys.PBC].reshape(3))
            res = {k: rec[k] for k in (keys.ENERGY, keys.FORCES, keys.CHARGES, keys.DIPOLE) if k in rec}
            if keys.STRESS in rec:
                res[keys.STRESS] = full_3x3_to_voigt_6_stress(rec[keys.STRESS].reshape(3, 3))
            atoms.calc = SinglePointCalculator(atoms, **res)
            db.write(atoms, total_charge=float(rec.get(keys.TOTAL_CHARGE, 0.0)))
    convert([source], out, r_max=r_max, dataset_name=name, progress=False,
            level_of_theory=(ds.manifest or {}).get("level_of_theory"))   # the sample keeps its provenance
    source.unlink()
    return str(out)
