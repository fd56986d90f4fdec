"""Read labels (energy, forces, stress, charges, dipole, total charge) off an ``ase.Atoms``.

Sources, in order: an explicit key given by the user (``key_map``), then the attached calculator's results
(what ``ase.io.read`` gives for extxyz/OUTCAR/db files), then the conventional ``atoms.info``/``atoms.arrays``
names. Returned arrays are float64 numpy in ASE units; a label that is not present is simply absent.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from .. import keys

# conventional places a label is found when the user names none (first match wins)
DEFAULT_SOURCES = {
    keys.ENERGY: ("energy", "free_energy", "REF_energy", "total_energy", "E"),
    keys.FORCES: ("forces", "REF_forces", "force", "F"),
    keys.STRESS: ("stress", "REF_stress"),
    keys.CHARGES: ("charges", "REF_charges", "partial_charges"),
    keys.DIPOLE: ("dipole", "REF_dipole"),
}
TOTAL_CHARGE_SOURCES = ("charge", "total_charge", "REF_total_charge")
PER_ATOM = {keys.FORCES: (3,), keys.CHARGES: ()}
PER_STRUCTURE = {keys.ENERGY: (), keys.STRESS: (3, 3), keys.DIPOLE: (3,)}


def _as_stress(value) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.size == 6:
        return voigt_6_to_full_3x3_stress(a.reshape(6))
    if a.size == 9:
        return a.reshape(3, 3)
    raise ValueError(f"stress has {a.size} values; expected 6 (Voigt xx yy zz yz xz xy) or 9 (3x3 row-major)")


def _lookup(atoms: Atoms, name: str, label: str):
    """Value of `name` for `label` in atoms.info/arrays/calc results, or None."""
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", {}) or {}
    if label in PER_ATOM and name in atoms.arrays:
        return atoms.arrays[name]
    if name in atoms.info:
        return atoms.info[name]
    if name in results:
        return results[name]
    return None


def read_labels(atoms: Atoms, key_map: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Labels of one structure as float64 arrays: energy (), forces (n,3), stress (3,3), charges (n,), dipole (3,).

    ``key_map`` maps our label name (``keys.ENERGY`` ...) to the name used in the file; a label named there
    must be present (``KeyError`` otherwise). ``total_charge`` (e) is always returned (default 0).
    """
    key_map = dict(key_map or {})
    n = len(atoms)
    out: dict[str, np.ndarray] = {}
    for label, defaults in DEFAULT_SOURCES.items():
        explicit = key_map.get(label)
        names = (explicit,) if explicit else defaults
        value = None
        for name in names:
            value = _lookup(atoms, name, label)
            if value is not None:
                break
        if value is None:
            if explicit:
                raise KeyError(f"label {label!r} was asked for under key {explicit!r}, which this structure does "
                               "not have "
                               f"(info keys: {sorted(atoms.info)}, array keys: {sorted(atoms.arrays)})")
            continue
        if label == keys.STRESS:
            out[label] = _as_stress(value)
            continue
        arr = np.asarray(value, dtype=np.float64)
        shape = (n, *PER_ATOM[label]) if label in PER_ATOM else PER_STRUCTURE[label]
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"label {label!r} has {arr.size} values; expected shape {shape}")
        out[label] = arr.reshape(shape)
    q = None
    for name in ((key_map[keys.TOTAL_CHARGE],) if keys.TOTAL_CHARGE in key_map else TOTAL_CHARGE_SOURCES):
        if name in atoms.info:
            q = atoms.info[name]
            break
    out[keys.TOTAL_CHARGE] = np.asarray(0.0 if q is None else q, dtype=np.float64).reshape(())
    return out
