"""``foundation data generate``: a multi-element demo corpus labelled by real calculators from PyPI.

- ``metals`` (ASE EMT; Al Cu Ag Au Ni Pd Pt): bulk fcc cells, strained, rattled, with vacancies, (111)/(100)
  slabs and random binary alloys; energy, forces, stress (stress only for fully periodic cells).
- ``molecules`` (tblite GFN2-xTB; H C N O): small molecules from ASE's G2 set, rattled conformers, dimers at
  0.5-2x contact distance (some beyond a 5 Å cutoff), closed-shell ions; energy, forces, charges, dipole, total charge.
- ``heldout`` (EMT): ordered and disordered Cu-Au alloys, a system absent from ``metals`` for fine-tuning demos.

Each part is written as an ASE database (streamed, one structure at a time) and converted to LMDB shards with
``foundation.data.convert.convert``, so the manifest, statistics and provenance are the standard ones.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111, molecule
from ase.calculators.calculator import CalculationFailed
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.collections import g2
from ase.db import connect
from threadpoolctl import threadpool_limits
from tqdm import tqdm

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
HELDOUT_ALLOY = ("Cu", "Au")


@dataclass(frozen=True)
class Preset:
    """Sizes of each part of a generated corpus (structures)."""
    metals: int
    molecules: int
    heldout: int


PRESETS = {"demo": Preset(metals=1600, molecules=1200, heldout=240),
           "tiny": Preset(metals=60, molecules=40, heldout=20)}


def _strain(atoms: Atoms, rng: np.random.Generator, amount: float) -> Atoms:
    eps = rng.uniform(-amount, amount, (3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
    return atoms


def _metal_structure(rng: np.random.Generator, elements: tuple[str, ...], alloy: bool) -> tuple[Atoms, str]:
    """One random metal configuration and its kind (bulk/strained/vacancy/surface/alloy)."""
    el = str(rng.choice(elements))
    kind = str(rng.choice(["bulk", "strained", "vacancy", "surface", "alloy"] if alloy or len(elements) > 1
                          else ["bulk", "strained", "vacancy", "surface"]))
    if alloy:
        kind = str(rng.choice(["bulk", "strained", "ordered"]))
    if kind == "surface":
        builder = fcc111 if rng.random() < 0.5 else fcc100
        atoms = builder(el, size=(2, 2, int(rng.integers(3, 5))), vacuum=6.0)
    else:
        reps = [(1, 1, 1), (2, 2, 2), (2, 1, 1), (1, 2, 2)][int(rng.integers(0, 4))]
        cubic = reps != (2, 2, 2)
        atoms = bulk(el, "fcc", cubic=cubic).repeat(reps)
    if alloy and kind == "ordered":
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((1, 1, 2))
        for i in range(0, len(atoms), 4):
            atoms[i].symbol = "Au"  # L1_2 Cu3Au motif
    elif kind == "alloy" or alloy:
        others = HELDOUT_ALLOY if alloy else elements
        partner = str(rng.choice([e for e in others if e != el] or list(others)))
        frac = rng.uniform(0.1, 0.5)
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.random(len(atoms)) < frac] = partner
        atoms.set_chemical_symbols(list(symbols))
        lattice = {e: bulk(e, "fcc").cell.cellpar()[0] for e in set(symbols) | {el}}
        mean_a = np.mean([lattice[s] for s in symbols])
        atoms.set_cell(atoms.cell.array * mean_a / lattice[el], scale_atoms=True)
    if kind == "vacancy" and len(atoms) > 2:
        del atoms[int(rng.integers(0, len(atoms)))]
    if kind in ("strained", "alloy", "ordered") or rng.random() < 0.3:
        _strain(atoms, rng, 0.04)
    atoms.rattle(stdev=float(rng.uniform(0.02, 0.15)), seed=int(rng.integers(0, 2**31)))
    return atoms, kind


def _label_emt(atoms: Atoms) -> Atoms:
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress(voigt=False)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def metal_structures(n: int, seed: int, elements=METALS, alloy: bool = False) -> Iterator[Atoms]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        atoms, kind = _metal_structure(rng, tuple(elements), alloy)
        atoms.info["config_type"] = kind
        yield _label_emt(atoms)


def _molecule_pool() -> list[str]:
    return [name for name in g2.names
            if set(g2[name].get_chemical_symbols()) <= set("HCNO") and 2 <= len(g2[name]) <= 12]


def _closed_shell_charge(atoms: Atoms, rng: np.random.Generator) -> int:
    """A total charge that makes the electron count even (anion or cation at random for radicals)."""
    if int(atoms.numbers.sum()) % 2 == 0:
        return 0
    return int(rng.choice([-1, 1]))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _molecular_structure(rng: np.random.Generator, pool: list[str]) -> Atoms:
    first = molecule(str(rng.choice(pool)))
    if rng.random() < 0.3:  # a dimer: a second molecule at a random orientation and distance
        second = molecule(str(rng.choice(pool)))
        second.positions = (second.positions - second.positions.mean(0)) @ _random_rotation(rng).T
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        radius = np.linalg.norm(first.positions - first.positions.mean(0), axis=1).max() \
            + np.linalg.norm(second.positions, axis=1).max()
        second.positions += first.positions.mean(0) + direction * (radius + rng.uniform(1.5, 6.0))
        first += second
        first.info["config_type"] = "dimer"
    else:
        first.info["config_type"] = "monomer"
    first.rattle(stdev=float(rng.uniform(0.01, 0.08)), seed=int(rng.integers(0, 2**31)))
    first.set_initial_magnetic_moments(np.zeros(len(first)))
    first.info["charge"] = _closed_shell_charge(first, rng)
    return first


def _label_xtb(atoms: Atoms) -> Atoms:
    from tblite.ase import TBLite  # optional dependency: pip install tblite
    atoms.calc = TBLite(method="GFN2-xTB", charge=float(atoms.info["charge"]), verbosity=0)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
               "charges": atoms.calc.get_charges(), "dipole": atoms.calc.get_dipole_moment()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def molecular_structures(n: int, seed: int) -> Iterator[Atoms]:
    rng = np.random.default_rng(seed)
    pool = _molecule_pool()
    made = 0
    while made < n:
        atoms = _molecular_structure(rng, pool)
        if len(atoms) > 1 and min(np.linalg.norm(atoms.positions[i] - atoms.positions[:i], axis=1).min()
                                  for i in range(1, len(atoms))) < 0.5:
            continue  # rattle or placement made two atoms overlap: draw again
        try:
            labelled = _label_xtb(atoms)
        except CalculationFailed:  # SCF did not converge for this geometry/charge: draw another
            continue
        yield labelled
        made += 1


PARTS: dict[str, tuple[str, Callable[[int, int], Iterator[Atoms]]]] = {
    "metals": ("EMT (ASE)", lambda n, seed: metal_structures(n, seed)),
    "molecules": ("GFN2-xTB (tblite)", lambda n, seed: molecular_structures(n, seed + 1)),
    "heldout": ("EMT (ASE)", lambda n, seed: metal_structures(n, seed + 2, elements=HELDOUT_ALLOY, alloy=True)),
}


def generate(preset: str, out: str | os.PathLike, seed: int = 0, shard_size: int = 1000) -> dict[str, Path]:
    """Generate every part of ``preset`` under ``out/<part>`` (each a converted LMDB dataset); returns the paths."""
    from .convert import convert
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    sizes = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    # One BLAS/OpenMP thread while labelling: xTB on a 2-30 atom molecule gains nothing from more, and on a busy
    # machine OpenMP's spinning barriers made each GFN2-xTB call 60-300x slower with 2 threads (4 ms -> 0.2-2 s).
    with tempfile.TemporaryDirectory(dir=out, prefix=".generate-") as tmp, threadpool_limits(limits=1):
        for part, (theory, make) in PARTS.items():
            source = Path(tmp) / f"{part}.db"  # an ASE sqlite db keeps float64 exactly (extxyz keeps 8 decimals)
            with connect(source, use_lock_file=False) as db:
                for atoms in tqdm(make(getattr(sizes, part), seed), total=getattr(sizes, part),
                                  desc=f"{part} [{theory}]"):
                    db.write(atoms, config_type=atoms.info["config_type"],
                             total_charge=int(atoms.info.get("charge", 0)))
            convert([str(source)], str(out / part), shard_size=shard_size, dataset_name=f"{preset}-{part}",
                    level_of_theory=theory)
            paths[part] = out / part
            source.unlink()
    return paths
