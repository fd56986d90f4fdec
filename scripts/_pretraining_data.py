"""Data of scripts/study_pretraining.py: the pretraining sets (mlearn Si/Ge/Mo, eight rMD17 molecules) and the
paracetamol and Li target splits, converted to LMDB through ``foundation.data.convert`` (cached by content hash).
Imported by the study (not a CLI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MOLECULES = ("aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic", "toluene", "uracil")
SOLIDS = ("Si", "Ge", "Mo")
HEADS = {"mlearn": "pbe_vasp", "rmd17": "pbe_def2svp"}


# --- data -------------------------------------------------------------------------------------------------------
def write_db(frames: list, path: Path) -> Path:
    """``frames`` (labelled ase.Atoms) written to the ASE database ``path`` (exact float64 labels)."""
    from ase.db import connect
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with connect(path, use_lock_file=False) as db:
        for atoms in frames:
            db.write(atoms)
    return path


def dataset(frames: list, work: Path, name: str, r_max: float) -> str:
    """``frames`` converted with ``foundation.data.convert`` into ``work/name``; the directory. Not converted
    again when the same frames (positions, numbers, energies) were converted at the same cutoff before."""
    import hashlib

    from foundation.data.convert import convert
    digest = hashlib.sha256(repr(r_max).encode())
    for atoms in frames:
        digest.update(atoms.numbers.tobytes() + atoms.positions.tobytes() + repr(atoms.get_potential_energy()).encode())
    key, stamp = digest.hexdigest(), work / "sources" / f"{name}.sha256"
    if stamp.is_file() and stamp.read_text() == key and (work / name / "manifest.json").is_file():
        return str(work / name)
    source = write_db(frames, work / "sources" / f"{name}.db")
    out = str(convert([source], work / name, r_max=r_max, dataset_name=name, progress=False))
    stamp.write_text(key)
    return out


def paracetamol_split(n_frames: int, sizes: list[int], n_valid: int) -> dict[str, np.ndarray]:
    """Frame indices: ``train{n}`` evenly spaced (nested when sizes divide each other) and ``valid`` (index 2 mod
    n_frames/n_valid), disjoint from every training subset."""
    out = {f"train{n}": np.linspace(0, n_frames, n, endpoint=False).astype(int) for n in sizes}
    out["valid"] = np.arange(2, n_frames, n_frames // n_valid)[:n_valid]
    used = set(np.concatenate([v for k, v in out.items() if k != "valid"]).tolist())
    if used & set(out["valid"].tolist()):
        raise ValueError(f"paracetamol validation frames overlap training frames for sizes {sizes}; "
                         "use sizes whose spacing 1000/n is a multiple of 5")
    return out


def li_split(n_frames: int, sizes: list[int], n_valid: int, seed: int) -> dict[str, np.ndarray]:
    """Frame indices: ``valid`` = the first n_valid of a seeded permutation, ``train{n}`` = the next n (nested)."""
    if n_valid + max(sizes) > n_frames:
        raise ValueError(f"Li_train.xyz has {n_frames} frames; {n_valid} validation + {max(sizes)} training "
                         "frames do not fit: lower --sizes")
    perm = np.random.default_rng([seed, 3]).permutation(n_frames)
    return {"valid": perm[:n_valid], **{f"train{n}": perm[n_valid:n_valid + n] for n in sizes}}


def prepare_data(a, data: Path, work: Path) -> dict:
    """Convert every dataset of the study; returns {"pretrain": {dir: head}, target: {"train": {n: dir},
    "valid": dir, "test": dir}}."""
    from foundation.data.readers import read_atoms as read
    pre = {}
    for el in SOLIDS:
        frames = read(str(data / "mlearn" / f"{el}_train.xyz.xz"), ":")
        pre[dataset(frames[:a.quick_frames or None], work, f"pre-{el}", a.r_max)] = HEADS["mlearn"]
    for mol in MOLECULES:
        frames = read(str(data / "rmd17" / f"rmd17_{mol}_train_01.xyz.xz"), f"::{a.every}")
        pre[dataset(frames[:a.quick_frames or None], work, f"pre-{mol}", a.r_max)] = HEADS["rmd17"]
    out = {"pretrain": pre}
    para = read(str(data / "rmd17" / "rmd17_paracetamol_train_01.xyz.xz"), ":")
    li = read(str(data / "mlearn" / "Li_train.xyz.xz"), ":")
    splits = {"paracetamol": (para, paracetamol_split(len(para), a.sizes, a.valid_frames_molecule)),
              "li": (li, li_split(len(li), a.sizes, a.valid_frames_li, a.seed))}
    tests = {"paracetamol": read(str(data / "rmd17" / "rmd17_paracetamol_test_01.xyz.xz"), ":"),
             "li": read(str(data / "mlearn" / "Li_test.xyz.xz"), ":")}
    for target, (frames, idx) in splits.items():
        out[target] = {"train": {n: dataset([frames[i] for i in idx[f"train{n}"]], work, f"{target}-train{n}",
                                            a.r_max) for n in a.sizes},
                       "valid": dataset([frames[i] for i in idx["valid"]], work, f"{target}-valid", a.r_max),
                       "test": dataset(tests[target][:a.quick_frames or None], work, f"{target}-test", a.r_max)}
    return out
