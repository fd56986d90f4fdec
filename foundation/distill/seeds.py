"""Seed structures of a distillation: built-in sets, ASE-readable files (evenly thinned), plain copies.

A leaf of the distillation package (its run, report and benchmarks read seeds through it).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ase import Atoms

from ..data.sampling import evenly_spaced

BUILTIN_SEEDS = ("silicon", "copper")


def builtin_seeds(name: str) -> list[Atoms]:
    """Built-in seed structures (no labels).

    ``silicon``: diamond Si primitive cells at a = 5.30/5.43/5.56 Å, the 8-atom cubic cell, a 64-atom supercell
    and the same with a vacancy (63 atoms). ``copper``: fcc Cu primitive cells at a = 3.50/3.61/3.72 Å, the
    4-atom cubic cell, a 32-atom supercell, the same with a vacancy, and a 4-layer (111) slab with vacuum.
    """
    from ase.build import bulk, fcc111
    if name == "silicon":
        kind, symbol, lattice, cubic_a = "diamond", "Si", (5.30, 5.43, 5.56), 5.43
    elif name == "copper":
        kind, symbol, lattice, cubic_a = "fcc", "Cu", (3.50, 3.61, 3.72), 3.61
    else:
        raise ValueError(f"unknown built-in seed set {name!r}; use one of {BUILTIN_SEEDS}")
    out = [bulk(symbol, kind, a=a) for a in lattice]
    out.append(bulk(symbol, kind, a=cubic_a, cubic=True))
    big = bulk(symbol, kind, a=cubic_a, cubic=True).repeat(2)
    vacancy = big.copy()
    del vacancy[0]
    out += [big, vacancy]
    if name == "copper":
        slab = fcc111(symbol, size=(2, 2, 4), a=cubic_a, vacuum=6.0)
        slab.pbc = True
        out.append(slab)
    return out


def evenly(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced over the list (all when ``limit`` is None)."""
    return [items[int(i)] for i in evenly_spaced(len(items), limit)]


def read_structures(paths: list[str], limit: int | None, what: str) -> list[Atoms]:
    """All frames of the existing ``paths`` (ASE-readable; labels kept on ``atoms.calc``), evenly thinned."""
    from ..data.readers import read_atoms
    frames = []
    for p in paths:
        try:
            frames.extend(read_atoms(p))
        except Exception as exc:
            raise ValueError(f"{what} file {p!r} could not be read by ASE ({exc}); give an extxyz/db/... file") from exc
    return evenly(frames, limit)


def load_seeds(config, log: Callable[[str], None] | None) -> tuple[list[Atoms], str]:
    """(seed structures, where they came from): ``seeds.files`` that exist, else ``seeds.builtin``."""
    s = config.seeds
    present = [p for p in s.files if Path(p).is_file()]
    if present:
        seeds = read_structures(present, s.max_structures, "seed")
        source = ", ".join(present)
    elif s.builtin:
        seeds, source = evenly(builtin_seeds(s.builtin), s.max_structures), f"built-in {s.builtin}"
        if s.files and log:
            log(f"seeds: none of {s.files} exist; using the built-in {s.builtin} structures")
    else:
        raise FileNotFoundError(f"seed files {s.files} not found; fix seeds.files or set seeds.builtin")
    if not seeds:
        raise ValueError(f"no seed structures in {source}")
    return seeds, source


def plain(atoms: Atoms) -> Atoms:
    """A copy with numbers, positions, cell and pbc only."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
