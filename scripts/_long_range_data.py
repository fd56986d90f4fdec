"""Data of scripts/study_long_range.py: GFN2-xTB (tblite) monomers, ions, rattled dimers and binding-curve
geometries, written as LMDB datasets through ``foundation.data.convert``. Imported by the study (not a CLI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TEST_BANDS = ((5.5, 6.5), (9.0, 10.5), (12.0, 13.0))   # COM separations (Å) held out for testing
RATTLE = 0.03          # Å, standard deviation of the per-atom rattle of dimers and monomers
MIN_CONTACT = 1.5      # Å, closest allowed intermolecular atom distance (proton transfer / overlap below)
PAIRS = {  # name: (molecule A, molecule B, kind)
    "H2O-H2O": ("water", "water", "polar"),
    "H2CO-H2O": ("formaldehyde", "water", "polar"),
    "NH3-H2O": ("ammonia", "water", "polar"),
    "HCOO(-)-NH4(+)": ("formate", "ammonium", "ion pair"),
    "CH3COO(-)-CH3NH3(+)": ("acetate", "methylammonium", "ion pair"),
    "NH4(+)-H2O": ("ammonium", "water", "net charge +1"),
}
CURVES = ("HCOO(-)-NH4(+)", "NH4(+)-H2O", "H2CO-H2O")   # binding curves: ion pair, ion-dipole, polar


# --- molecules and xTB labels ------------------------------------------------------------------------------
def _xtb(atoms, charge: float):
    from tblite.ase import TBLite  # pip install tblite
    atoms.calc = TBLite(method="GFN2-xTB", charge=float(charge), verbosity=0)
    return atoms


def _deprotonate(atoms):
    """The carboxylate: ``atoms`` without its O-H hydrogen."""
    d = atoms.get_all_distances()
    acid_h = [i for i, a in enumerate(atoms) if a.symbol == "H" and any(
        atoms[j].symbol == "O" and d[i, j] < 1.2 for j in range(len(atoms)))]
    del atoms[acid_h[0]]
    return atoms


def _protonate(atoms):
    """The ammonium: an H added on N opposite to its bonds (the lone pair), 1.02 Å away."""
    from ase import Atoms
    n = next(i for i, a in enumerate(atoms) if a.symbol == "N")
    d = atoms.get_all_distances()[n]
    bonds = sum((atoms.positions[j] - atoms.positions[n]) / d[j] for j in range(len(atoms)) if j != n and d[j] < 1.6)
    atoms += Atoms("H", [atoms.positions[n] - 1.02 * bonds / np.linalg.norm(bonds)])
    return atoms


def monomers() -> dict:
    """{name: (Atoms relaxed with GFN2-xTB at its charge, COM at the origin, total charge e)}."""
    from ase.build import molecule
    from ase.optimize import BFGS
    raw = {"water": (molecule("H2O"), 0), "formaldehyde": (molecule("H2CO"), 0), "ammonia": (molecule("NH3"), 0),
           "formate": (_deprotonate(molecule("HCOOH")), -1), "ammonium": (_protonate(molecule("NH3")), 1),
           "acetate": (_deprotonate(molecule("CH3COOH")), -1),
           "methylammonium": (_protonate(molecule("H3CNH2")), 1)}
    for atoms, charge in raw.values():
        BFGS(_xtb(atoms, charge), logfile=None).run(fmax=0.01, steps=200)
        atoms.calc = None
        atoms.positions -= atoms.get_center_of_mass()
    return raw


def label(atoms, charge: int):
    """``atoms`` with GFN2-xTB energy (eV), forces (eV/Å), charges (e), dipole (e·Å) as a stored calculator."""
    from ase.calculators.singlepoint import SinglePointCalculator
    _xtb(atoms, charge)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
               "charges": atoms.calc.get_charges(), "dipole": atoms.calc.get_dipole_moment()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["charge"] = int(charge)
    return atoms


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def d_min(atoms, n_first: int) -> float:
    """Closest distance (Å) between an atom of the first ``n_first`` atoms and one of the others."""
    p = atoms.positions
    return float(np.linalg.norm(p[:n_first, None] - p[None, n_first:], axis=-1).min())


def dimer(a, b, rot_a: np.ndarray, rot_b: np.ndarray, separation: float):
    """A (rotated, COM at 0) + B (rotated, COM at (R, 0, 0)); both inputs have their COM at the origin."""
    first, second = a.copy(), b.copy()
    first.positions = first.positions @ rot_a.T
    second.positions = second.positions @ rot_b.T + [separation, 0.0, 0.0]
    return first + second


def make_dimers(mols: dict, per_pair: int, r_near: float, r_far: float, rng) -> list:
    """(rattled dimers at COM separations uniform in [r_near, r_far] Å, number of SCF failures redrawn);
    info: pair, kind, R, d_min, n_first."""
    from ase.calculators.calculator import CalculationFailed
    out, failed = [], 0
    for pair, (name_a, name_b, kind) in PAIRS.items():
        (a, qa), (b, qb) = mols[name_a], mols[name_b]
        made = 0
        while made < per_pair:
            separation = float(rng.uniform(r_near, r_far))
            atoms = dimer(a, b, _rotation(rng), _rotation(rng), separation)
            atoms.rattle(stdev=RATTLE, seed=int(rng.integers(2**31)))
            if d_min(atoms, len(a)) < MIN_CONTACT:
                continue
            try:
                label(atoms, qa + qb)
            except CalculationFailed:   # SCF did not converge: draw another geometry
                failed += 1
                continue
            atoms.info.update(pair=pair, kind=kind, R=separation, d_min=d_min(atoms, len(a)), n_first=len(a))
            out.append(atoms)
            made += 1
    return out, failed


def make_monomers(mols: dict, copies: int, rng) -> list:
    """``copies`` rattled, labelled copies of each monomer (training data)."""
    out = [atoms.copy() for atoms, _ in mols.values() for _ in range(copies)]
    for m, (name, (_, charge)) in zip(out, [item for item in mols.items() for _ in range(copies)]):
        m.rattle(stdev=RATTLE, seed=int(rng.integers(2**31)))
        label(m, charge).info.update(pair=name, kind="monomer", R=float("nan"), d_min=float("inf"), n_first=len(m))
    return out


def in_test_band(separation: float) -> bool:
    return any(lo <= separation < hi for lo, hi in TEST_BANDS)


def write_dataset(frames: list, directory: Path, name: str) -> tuple[Path, list[dict]]:
    """ASE db -> ``foundation.data.convert`` -> LMDB dataset at ``directory``; returns (path, per-record info)."""
    from ase.db import connect

    from foundation.data.convert import convert
    directory.parent.mkdir(parents=True, exist_ok=True)
    source = directory.parent / f"{name}.db"
    source.unlink(missing_ok=True)
    with connect(source, use_lock_file=False) as db:
        for atoms in frames:
            db.write(atoms, total_charge=int(atoms.info["charge"]))
    convert([str(source)], str(directory), dataset_name=f"long-range-{name}", level_of_theory="GFN2-xTB (tblite)",
            progress=False)
    info = [{k: atoms.info[k] for k in ("pair", "kind", "R", "d_min", "n_first", "charge")} for atoms in frames]
    return directory, info


def curve_geometries(mols: dict, separations: np.ndarray) -> dict:
    """{pair: (monomer A, monomer B, [dimers])}: dipoles (about the COM, xTB) of A and B aligned with +x."""
    from ase.calculators.calculator import CalculationFailed

    def aligned(atoms, charge):
        mu = label(atoms.copy(), charge).calc.results["dipole"]
        mu = mu / np.linalg.norm(mu)
        v, c = np.cross(mu, [1.0, 0.0, 0.0]), float(mu[0])   # Rodrigues: rotation taking mu to +x
        k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        out = atoms.copy()
        out.positions = out.positions @ (np.eye(3) + k + k @ k / (1 + c) if c > -1 + 1e-9 else np.diag([-1, -1, 1.0])).T
        return out
    curves = {}
    for pair in CURVES:
        (a, qa), (b, qb) = mols[PAIRS[pair][0]], mols[PAIRS[pair][1]]
        a, b = aligned(a, qa), aligned(b, qb)
        dimers = []
        for r in separations:
            d = dimer(a, b, np.eye(3), np.eye(3), float(r))
            d.info["R"] = float(r)
            if d_min(d, len(a)) < MIN_CONTACT:
                continue
            try:
                dimers.append(label(d, qa + qb))
            except CalculationFailed:   # SCF not converged (far ion pairs, now and then): no xTB point there
                continue
        curves[pair] = (label(a, qa), label(b, qb), dimers)
    return curves
