"""Exploration and selection: the user's structures, committee MD over a temperature x pressure grid, the frames
whose force deviation falls inside the trust window, and a diverse pick of them.

Every frame carries ``info``: ``max_devi_f`` (eV/Å, the committee's), ``run`` (index of its MD run),
``temperature_K``, ``pressure_GPa``, ``md_step``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

from .. import keys


def build_structures(entries: list[Any], where: str = "structures") -> list[Atoms]:
    """Atoms from recipe entries: an ASE-readable file (all frames) or a ``{bulk: SYMBOL, ...}`` mapping
    (``ase.build.bulk`` keywords + ``repeat`` [a, b, c] + ``substitute`` {symbol: fraction} with ``seed``)."""
    from pathlib import Path

    from ase.build import bulk

    from ..data.readers import read_atoms
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if not Path(entry).is_file():
                raise FileNotFoundError(f"recipe key '{where}[{i}]': structure file {entry!r} not found")
            frames = read_atoms(entry)
            out += [Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc) for a in frames]
            continue
        if not isinstance(entry, dict) or "bulk" not in entry:
            raise ValueError(f"recipe key '{where}[{i}]' must be a file path or a mapping with 'bulk: SYMBOL', "
                             f"got {entry!r}")
        spec = dict(entry)
        name, repeat = spec.pop("bulk"), spec.pop("repeat", [1, 1, 1])
        substitute, seed = spec.pop("substitute", {}) or {}, int(spec.pop("seed", 0))
        try:
            atoms = bulk(name, **spec).repeat(tuple(int(r) for r in repeat))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"recipe key '{where}[{i}]': ase.build.bulk({name!r}, {spec}) failed: {exc}") from None
        rng = np.random.default_rng([seed, i])
        free = list(rng.permutation(len(atoms)))
        for symbol, fraction in substitute.items():
            take = int(round(float(fraction) * len(atoms)))
            for j in (free.pop() for _ in range(min(take, len(free)))):
                atoms[int(j)].symbol = symbol
        out.append(atoms)
    return out


def rattled(structures: list[Atoms], copies: int, stdev: float, seed: int) -> list[Atoms]:
    """The structures and ``copies`` Gaussian-rattled copies of each (``stdev`` Å per component), seeded."""
    out = []
    for i, atoms in enumerate(structures):
        out.append(atoms.copy())
        for c in range(copies):
            a = atoms.copy()
            a.positions += np.random.default_rng([seed, 7, i, c]).normal(0.0, stdev, a.positions.shape)
            out.append(a)
    return out


def min_distance(atoms: Atoms) -> float:
    """Smallest interatomic distance (Å, minimum image); inf for one atom."""
    if len(atoms) < 2:
        return float("inf")
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    return float(np.min(d[np.triu_indices(len(atoms), 1)]))


def explore(structures: list[Atoms], calc, settings, seed: int, log=None) -> list[Atoms]:
    """Committee MD from every structure at every (temperature, pressure); returns the frames (module doc).

    ``calc``: a committee ``FoundationCalculator`` (its results carry ``max_devi_f``); ``settings``: an
    ``ExploreSection``. Run r is seeded by (``seed``, r)."""
    from ..md import initialize_velocities, make_dynamics
    pressures = settings.pressures if settings.ensemble == "npt" else [0.0]
    runs = [(a, t, p) for a in structures for t in settings.temperatures for p in pressures]
    frames: list[Atoms] = []
    for r, (start, temperature, pressure) in enumerate(runs):
        atoms = start.copy()
        atoms.calc = calc
        initialize_velocities(atoms, temperature, seed=int(np.random.default_rng([seed, r]).integers(2**31)))
        dyn = make_dynamics(atoms, settings.ensemble, settings.timestep, temperature,
                            friction_per_fs=settings.friction, pressure_gpa=pressure, seed=seed * 1009 + r)
        kept = 0
        for step in range(settings.interval, settings.steps + 1, settings.interval):
            dyn.run(settings.interval)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            frame.info.update(max_devi_f=float(calc.results[keys.MAX_DEVI_F]), run=r, temperature_K=temperature,
                              pressure_GPa=pressure, md_step=step)
            if min_distance(frame) < settings.min_distance:
                break
            frames.append(frame)
            kept += 1
        if log:
            devi = [f.info["max_devi_f"] for f in frames[len(frames) - kept:]]
            log(f"explore run {r}: {start.get_chemical_formula()} at {temperature:g} K"
                + (f", {pressure:g} GPa" if settings.ensemble == "npt" else "")
                + f": {kept} frames, max_devi_f {min(devi, default=0):.3g}-{max(devi, default=0):.3g} eV/Å")
    return frames


def classify(frames: list[Atoms], trust_lo: float, trust_hi: float) -> dict[str, list[int]]:
    """Indices of ``accurate`` (max_devi_f < trust_lo), ``candidate`` and ``failed`` (>= trust_hi) frames."""
    devi = np.array([f.info["max_devi_f"] for f in frames], float)
    return {"accurate": np.flatnonzero(devi < trust_lo).tolist(),
            "candidate": np.flatnonzero((devi >= trust_lo) & (devi < trust_hi)).tolist(),
            "failed": np.flatnonzero(devi >= trust_hi).tolist()}


def descriptor(atoms: Atoms, elements: list[int], r_max: float, bins: int = 24, width: float = 0.15) -> np.ndarray:
    """Per-atom pair-distance histogram per element pair, Gaussian-smoothed (``width`` Å) on [0.5, r_max] Å."""
    from ase.neighborlist import neighbor_list
    i, j, d = neighbor_list("ijd", atoms, r_max)
    pairs = [(a, b) for n, a in enumerate(elements) for b in elements[n:]]
    centres = np.linspace(0.5, r_max, bins)
    out = np.zeros((len(pairs), bins))
    zi, zj = atoms.numbers[i], atoms.numbers[j]
    for p, (a, b) in enumerate(pairs):
        mask = ((zi == a) & (zj == b)) | ((zi == b) & (zj == a))
        if mask.any():
            out[p] = np.exp(-((d[mask, None] - centres) / width) ** 2).sum(0)
    return out.ravel() / max(len(atoms), 1)


def pick(frames: list[Atoms], candidates: list[int], count: int, method: str, r_max: float) -> list[int]:
    """At most ``count`` of ``candidates`` (indices into ``frames``): ``time`` evenly spaced in order;
    ``farthest`` farthest-point sampling in descriptor space from the candidate with the largest max_devi_f."""
    if len(candidates) <= count:
        return list(candidates)
    if method == "time":
        return [candidates[int(k)] for k in np.linspace(0, len(candidates) - 1, count).round().astype(int)]
    elements = sorted({int(z) for c in candidates for z in frames[c].numbers})
    x = np.stack([descriptor(frames[c], elements, r_max) for c in candidates])
    first = int(np.argmax([frames[c].info["max_devi_f"] for c in candidates]))
    chosen, dist = [first], np.linalg.norm(x - x[first], axis=1)
    while len(chosen) < count:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return sorted(candidates[c] for c in chosen)


def labeller_md(structures: list[Atoms], calc, temperatures: list[float], frames: int, interval: int,
                seed: int) -> list[Atoms]:
    """``frames`` frames of Langevin MD driven by the labeller itself (held-out test data), spread over the
    (structure, temperature) runs; each frame keeps the labeller's energy and forces (SinglePointCalculator)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from ..md import initialize_velocities, make_dynamics
    runs = [(a, t) for a in structures for t in temperatures]
    out: list[Atoms] = []
    for r, (start, temperature) in enumerate(runs):
        want = frames // len(runs) + (r < frames % len(runs))
        atoms = start.copy()
        atoms.calc = calc
        initialize_velocities(atoms, temperature, seed=seed * 31 + r)
        dyn = make_dynamics(atoms, "nvt", 2.0, temperature, friction_per_fs=0.02, seed=seed * 37 + r)
        for _ in range(want):
            dyn.run(interval)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(),
                                               forces=atoms.get_forces())
            frame.info.update(temperature_K=temperature, run=r)
            out.append(frame)
    return out
