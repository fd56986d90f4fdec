"""Datasets, loaders and starting statistics of a training run (thin glue over ``foundation.data``).

Training datasets are LMDB shard directories (``foundation data convert``), mixed by ``data.weights``, one
readout head per dataset (``data.heads``). Without ``data.valid`` a seeded ``data.valid_fraction`` of each
training set is held out (a set of fewer than ``MIN_SPLIT`` = 2 structures is not split: all of it trains, and
the run says so). Statistics for ``model.set_statistics`` come from each dataset's manifest when one dataset
feeds a head and it was converted at the model's cutoff; otherwise they are computed from the records.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .. import keys
from .config import TrainConfig

NEIGHBOR_SAMPLE = 1000   # structures used to estimate the mean neighbor count when it must be computed
MIN_SPLIT = 2            # a training set with fewer structures is not split: validation would take all of it


class Subset(torch.utils.data.Dataset):
    """``dataset`` restricted to ``indices`` (keeps ``natoms`` and ``record`` for sampling and statistics)."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, np.int64)
        self.natoms = np.asarray(dataset.natoms)[self.indices]
        self.name = getattr(dataset, "name", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def record(self, i):
        return self.dataset.record(int(self.indices[i]))


def _open(path: str, r_max: float, index: int, head: int):
    from ..data import ShardedDataset
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {path!r} not found; set data.train/data.valid to directories written by "
                                "'foundation data convert' (or 'foundation data generate')")
    if p.is_file() and p.suffix not in (".lmdb", ".mdb"):
        raise ValueError(f"dataset {path!r} is a {p.suffix or 'plain'} file; convert it first with "
                         f"'foundation data convert {path} --out DIR' and train on DIR")
    # float64 as stored: the model casts positions to its own dtype, so an fp64 run sees them exactly
    ds = ShardedDataset(p, r_max=r_max, head=head, dataset_index=index, dtype=torch.float64)
    ds.name = (ds.manifest or {}).get("name") or p.name
    return ds


def card_datasets(datasets: list, head_names: list[str], dataset_heads: list[int]) -> list[dict]:
    """Model-card rows of the training datasets: name, structures trained on (the split, not the whole set),
    level of theory, license and elements from the dataset's manifest (None when not recorded), and the head it
    trains (the card's example runs a head on elements it was trained on)."""
    rows = []
    for ds, head in zip(datasets, dataset_heads):
        manifest = getattr(getattr(ds, "dataset", ds), "manifest", None) or {}   # a Subset wraps the dataset
        rows.append({"name": ds.name, "structures": len(ds), "level_of_theory": manifest.get("level_of_theory"),
                     "license": manifest.get("license"), "head": head_names[head],
                     "elements": manifest.get("elements")})
    return rows


def head_names(config: TrainConfig) -> tuple[list[str], list[int]]:
    """(unique head names in order of appearance, head index of each training dataset)."""
    names = config.data.heads or ["default"] * len(config.data.train)
    unique = list(dict.fromkeys(names))
    return unique, [unique.index(n) for n in names]


def open_datasets(config: TrainConfig, r_max: float) -> tuple[list, list]:
    """(training datasets, validation datasets), each a list aligned with ``data.train`` entries.

    With explicit ``data.valid`` paths, validation dataset k has head and dataset index of training dataset
    min(k, D-1) (give them in the same order). Otherwise each training dataset is split (seeded).
    """
    if not config.data.train:
        raise ValueError("data.train is empty; give one or more dataset directories, e.g. --set data.train=[DIR]")
    _, heads = head_names(config)
    train = [_open(p, r_max, i, heads[i]) for i, p in enumerate(config.data.train)]
    if config.data.valid:
        d = len(train)
        valid = [_open(p, r_max, min(k, d - 1), heads[min(k, d - 1)]) for k, p in enumerate(config.data.valid)]
        return train, valid
    if config.data.valid_fraction == 0:
        return train, []
    splits, valid = [], []
    for i, ds in enumerate(train):
        if len(ds) < MIN_SPLIT:
            splits.append(ds)
            valid.append(Subset(ds, np.zeros(0, np.int64)))
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"foundation: dataset {config.data.train[i]} has {len(ds)} structure(s), too few to hold out "
                      f"a validation split (at least {MIN_SPLIT}): all of it trains and none validates; give "
                      "data.valid to validate", flush=True)
            continue
        perm = np.random.default_rng([config.seed, 7, i]).permutation(len(ds))
        n_valid = max(1, int(round(config.data.valid_fraction * len(ds))))
        splits.append(Subset(ds, np.sort(perm[n_valid:])))
        valid.append(Subset(ds, np.sort(perm[:n_valid])))
    return splits, (valid if any(len(v) for v in valid) else [])


def make_train_loader(config: TrainConfig, datasets: list, rank: int, world: int):
    """A resumable loader over the mixture of ``datasets``: atom-budget batches, this rank's share."""
    from ..data.loader import MixedDataset, make_loader
    from ..data.sampling import AtomBudgetBatchSampler
    mixed = MixedDataset(datasets, weights=config.data.weights, names=[d.name for d in datasets])
    sampler = AtomBudgetBatchSampler.from_dataset(mixed, config.data.max_atoms, shuffle=config.data.shuffle,
                                                  seed=config.seed, num_replicas=world, rank=rank)
    return make_loader(mixed, sampler, num_workers=config.data.num_workers)


def make_eval_loader(datasets: list, max_atoms: int, rank: int, world: int, num_workers: int = 0):
    """Every structure of ``datasets`` once (over all ranks), in a fixed order."""
    from ..data.loader import MixedDataset, make_loader
    from ..data.sampling import AtomBudgetBatchSampler
    mixed = MixedDataset(datasets, names=[d.name for d in datasets])
    sampler = AtomBudgetBatchSampler(mixed.natoms, max_atoms, dataset_sizes=mixed.dataset_sizes,
                                     probabilities=mixed.dataset_sizes.astype(float), shuffle=False,
                                     num_replicas=world, rank=rank)
    return make_loader(mixed, sampler, num_workers=num_workers)


def batches_forever(loader):
    """Endless stream of batches across epochs, continuing from the loader's (restored) position."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)


def elements_of(datasets: list) -> list[str]:
    """Chemical symbols present in the datasets' manifests, sorted by atomic number."""
    from ase.data import atomic_numbers
    symbols = set()
    for ds in datasets:
        base = getattr(ds, "dataset", ds)
        for m in getattr(base, "manifests", None) or []:
            symbols |= set(m.get("elements") or [])
    if not symbols:
        raise ValueError("the training data's manifests list no elements; set model.elements in the recipe")
    return sorted(symbols, key=lambda s: atomic_numbers[s])


def statistics(datasets: list, r_max: float) -> dict:
    """{"atomic_energies" {symbol: eV}, "scale" (eV/Å, force RMS), "shift" (eV/atom), "avg_num_neighbors"} of the
    training data of one head: from the manifest when possible, computed from the records otherwise."""
    from ..data.stats import StatsAccumulator
    base = [getattr(ds, "dataset", ds) for ds in datasets]
    s = base[0].statistics if len(base) == 1 and base[0].statistics else None
    if s is None or not s["e0s"] or s["force_rms"] is None:
        acc = StatsAccumulator(r_max=None)
        for ds in datasets:
            for i in range(len(ds)):
                rec = ds.record(i)
                acc.update(rec[keys.ATOMIC_NUMBERS], {k: rec[k] for k in (keys.ENERGY, keys.FORCES) if k in rec})
        from ase.data import atomic_numbers
        res = acc.result()
        s = {"e0s": {atomic_numbers[k]: v for k, v in (res["reference_energies"] or {}).items()},
             "force_rms": res["force_rms"], "energy_shift": res.get("energy_per_atom_mean"), "r_max": None,
             "avg_num_neighbors": None}
    avg = s["avg_num_neighbors"]
    if avg is None or s.get("r_max") is None or abs(float(s["r_max"]) - r_max) > 1e-9:
        edges = atoms = 0
        for ds in datasets:
            for i in range(min(len(ds), NEIGHBOR_SAMPLE)):
                item = ds[i]
                edges += item[keys.EDGE_INDEX].shape[1]
                atoms += item[keys.ATOMIC_NUMBERS].shape[0]
        avg = edges / max(atoms, 1)
    from ase.data import chemical_symbols
    return {"atomic_energies": {chemical_symbols[int(z)]: float(e) for z, e in s["e0s"].items()},
            "scale": s["force_rms"] or 1.0, "shift": s.get("energy_shift") or 0.0,
            "avg_num_neighbors": float(avg)}


def fill_elements(atomic_energies: dict, elements: list[str]) -> dict:
    """E0 for every model element: the fitted values, 0 eV for elements absent from this head's data."""
    return {s: float(atomic_energies.get(s, 0.0)) for s in elements}


def label_counts(manifest: dict) -> dict[str, int]:
    """{label: structures carrying it} of a converted dataset: the per-label ``count`` of the manifest's
    ``properties`` when recorded, else (manifests written before per-label counts) every structure."""
    total = int(manifest.get("num_structures") or sum(int(s.get("count", 0)) for s in manifest.get("shards", [])))
    props = manifest.get("properties") or []
    info = props if isinstance(props, dict) else dict.fromkeys(props, {})
    return {str(k): int(v["count"]) if isinstance(v, dict) and "count" in v else total for k, v in info.items()}


def check_loss_labels(config: TrainConfig) -> None:
    """Refuse a loss term with a non-zero coefficient (at any step of the schedule) whose label no training
    structure has: it would train nothing and log a loss of 0. Datasets given as shard files (no manifest) are
    assumed to have every label."""
    from ..data.manifest import read_manifest
    from .loss import LABEL_FREE, Loss
    found: dict[str, dict[str, int]] = {}
    for path in config.data.train:
        if not (Path(path) / "manifest.json").is_file():
            return
        found[str(path)] = label_counts(read_manifest(Path(path)))
    for prop in Loss(config.loss, config.max_steps).properties:
        if prop not in LABEL_FREE and not any(counts.get(prop, 0) > 0 for counts in found.values()):
            have = "; ".join(f"{p}: {sorted(k for k, v in c.items() if v > 0)}" for p, c in found.items())
            raise ValueError(f"the loss weights {prop!r} (loss.coefficients or loss.schedule), but no training "
                             f"structure has a {prop!r} label ({have}); set its coefficient to 0 "
                             f"(--set loss.coefficients.{prop}=0) or train on data labelled with it")
