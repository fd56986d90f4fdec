"""Distillation configurations: seeds -> seeds, teacher MD frames, rattled and strained copies; on-policy picks.

``generate_configurations(seeds, calculator, settings)`` returns new ``Atoms`` (no calculator attached), in a
fixed order: for each seed in turn, the seed itself, its rattled copies, its strained copies, then its MD
frames for each temperature. Every random choice comes from a generator seeded by (``settings.seed``, a
digest of the seed structure, kind, temperature), so the same seed and settings give the same configurations
(bit for bit with a deterministic calculator) whatever else is in the list (``md_seeds`` aside, which picks
seeds by position). Each configuration carries ``info``:
``config_type`` ("seed" | "rattle" | "strain" | "md"), ``seed_index``, ``temperature_K`` (MD; else 0) and
``md_step`` (MD; else -1).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from ase import Atoms, units

CONFIG_TYPES = ("seed", "rattle", "strain", "md", "onpolicy")  # "onpolicy": frames picked from student MD
_KIND_CODE = {"rattle": 1, "strain": 2, "md": 3}


@dataclass
class ConfigurationSettings:
    """How configurations are made from seeds. Lengths Å, temperatures K, times fs.

    temperatures: MD temperatures (K); the distillation recipe uses 0.5-1.5x the target temperature.
    md_steps: Langevin steps per (seed, temperature); md_interval: keep every k-th step (first kept = step k).
    md_seeds: run MD from at most this many seeds (evenly spaced over the list; None = all).
    rattle_copies / rattle_stdev: Gaussian displacement copies per seed (std per Cartesian component, Å).
    strain_copies / max_strain: copies with a random symmetric strain, components uniform in [-max, max]
    (fully periodic seeds only; atoms move with the cell), plus ``strain_rattle`` Å of Gaussian noise.
    min_distance: copies or frames with two atoms closer than this (Å) are redrawn / stop MD with an error.
    """

    temperatures: list[float] = field(default_factory=lambda: [150.0, 300.0, 450.0])
    md_steps: int = 100
    md_interval: int = 10
    md_timestep: float = 1.0
    md_friction: float = 0.02
    md_seeds: int | None = None
    rattle_copies: int = 2
    rattle_stdev: float = 0.05
    strain_copies: int = 2
    max_strain: float = 0.03
    strain_rattle: float = 0.01
    include_seeds: bool = True
    min_distance: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        self.temperatures = [float(t) for t in self.temperatures]
        checks = [(all(t > 0 for t in self.temperatures), "temperatures must be > 0 K"),
                  (self.md_steps >= 0, "md_steps must be >= 0"), (self.md_interval >= 1, "md_interval must be >= 1"),
                  (self.md_timestep > 0, "md_timestep must be > 0 fs"), (self.md_friction >= 0, "md_friction >= 0"),
                  (self.md_seeds is None or self.md_seeds >= 0, "md_seeds must be >= 0 or None"),
                  (self.rattle_copies >= 0 and self.strain_copies >= 0, "copies must be >= 0"),
                  (self.rattle_stdev >= 0 and self.strain_rattle >= 0, "rattle amplitudes must be >= 0 Å"),
                  (0 <= self.max_strain < 0.5, "max_strain must be in [0, 0.5)"),
                  (self.min_distance >= 0, "min_distance must be >= 0 Å")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"configuration settings: {message} (got {self.to_dict()})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigurationSettings:
        """Settings from a recipe section; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"configuration settings have unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(settings: ConfigurationSettings, seed: Atoms, kind: str, copy: int) -> np.random.Generator:
    """Generator for one (seed structure, kind, copy): depends on the structure itself, not its list position."""
    from .teacher import structure_digest
    digest = structure_digest(seed)
    words = [int(digest[i:i + 8], 16) for i in range(0, 32, 8)]
    return np.random.default_rng([int(settings.seed) & 0xFFFFFFFF, *words, _KIND_CODE[kind], copy])


def min_distance(atoms: Atoms, cutoff: float = 2.0, max_cutoff: float = 16.0) -> float:
    """Shortest interatomic distance (Å), periodic images included; inf if there is no pair within
    ``max_cutoff`` Å. The neighbour search starts at ``cutoff`` Å and doubles until it finds a pair."""
    from ..data.graph import neighbor_list
    while cutoff <= max_cutoff:
        edges, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        if edges.shape[1]:
            vec = atoms.positions[edges[1]] - atoms.positions[edges[0]] + unit @ atoms.cell.array
            return float(np.sqrt(np.min(np.einsum("ij,ij->i", vec, vec))))
        cutoff *= 2
    return float("inf")


def _tagged(atoms: Atoms, kind: str, seed_index: int, temperature: float = 0.0, step: int = -1) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update(config_type=kind, seed_index=int(seed_index), temperature_K=float(temperature), md_step=int(step))
    return out


def _draw(make: Callable[[np.random.Generator], Atoms], rng, limit: float, what: str, tries: int = 20) -> Atoms:
    for _ in range(tries):
        atoms = make(rng)
        if min_distance(atoms) >= limit:
            return atoms
    raise ValueError(f"{what}: {tries} draws all had atoms closer than min_distance={limit} Å; "
                     f"lower rattle_stdev/max_strain or min_distance")


def rattled(atoms: Atoms, stdev: float, rng: np.random.Generator) -> Atoms:
    """A copy with Gaussian displacements (std ``stdev`` Å per component)."""
    out = atoms.copy()
    out.positions = out.positions + rng.normal(0.0, stdev, out.positions.shape)
    return out


def strained(atoms: Atoms, max_strain: float, noise: float, rng: np.random.Generator) -> Atoms:
    """A copy under a random symmetric strain e (components uniform in [-max, max]): cell -> cell (I + e),
    atoms moved with the cell, then Gaussian noise of ``noise`` Å."""
    e = rng.uniform(-max_strain, max_strain, (3, 3))
    e = 0.5 * (e + e.T)
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + e), scale_atoms=True)
    if noise > 0:
        out.positions = out.positions + rng.normal(0.0, noise, out.positions.shape)
    return out


MIN_MD_ATOMS = 8


def md_cell(atoms: Atoms, min_atoms: int = MIN_MD_ATOMS) -> Atoms:
    """The cell MD starts from: a periodic seed with fewer than ``min_atoms`` atoms is repeated along its periodic
    directions until it has at least that many (a 1-atom primitive cell has no motion once the centre of mass is
    fixed, and thermalising it divides by a zero temperature); other seeds are used as they are."""
    reps = [1, 1, 1]
    axis = 0
    while len(atoms) * int(np.prod(reps)) < min_atoms and atoms.pbc.any():
        while not atoms.pbc[axis % 3]:
            axis += 1
        reps[axis % 3] += 1
        axis += 1
    return atoms.repeat(reps) if reps != [1, 1, 1] else atoms


def run_md_frames(atoms: Atoms, calculator, temperature: float, steps: int, interval: int, timestep: float,
                  friction: float, rng: np.random.Generator, min_dist: float = 0.0,
                  label: str = "MD") -> list[tuple[int, Atoms]]:
    """Langevin MD (ASE) from ``atoms`` at ``temperature`` K: [(step, frame copy)] every ``interval`` steps.

    Velocities start from Maxwell-Boltzmann at ``temperature``; ``timestep`` fs, ``friction`` 1/fs. Used for
    teacher MD and for the student's own MD in on-policy rounds. Raises ``ValueError`` (naming ``label`` and
    the step) if forces become non-finite or two atoms come closer than ``min_dist`` Å.
    """
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin
    if len(atoms) < 2:
        raise ValueError(f"{label}: MD needs at least 2 atoms (the centre of mass is fixed), got {len(atoms)}; "
                         f"use a supercell (md_cell) or leave this structure out of MD")
    work = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.calc = calculator
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution  # ase >= 3.29 / older
    thermalize(work, temperature_K=temperature, rng=rng)
    vd.Stationary(work)
    work.set_constraint(FixCom())  # no drift of the centre of mass (momentum removed, then kept at zero)
    dyn = Langevin(work, timestep * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng,
                   fixcm=False)
    frames = []
    for step in range(interval, steps + 1, interval):
        dyn.run(interval)
        if not np.all(np.isfinite(work.positions)):
            raise ValueError(f"{label}: positions became non-finite by step {step} of MD at {temperature} K (the "
                             f"potential blew the structure apart); lower the temperature or the time step, or "
                             f"use a better-trained teacher")
        forces = work.get_forces()
        if not np.all(np.isfinite(forces)):
            raise ValueError(f"{label}: non-finite forces at step {step} of MD at {temperature} K; "
                             f"lower the temperature or the time step")
        if min_dist > 0 and min_distance(work) < min_dist:
            raise ValueError(f"{label}: two atoms came closer than {min_dist} Å at step {step} of MD at "
                             f"{temperature} K (the potential let the structure collapse); lower the temperature "
                             f"or md_steps, or use a better teacher")
        frames.append((step, Atoms(numbers=work.numbers, positions=work.positions.copy(), cell=work.cell.copy(),
                                   pbc=work.pbc.copy())))
    work.calc = None
    return frames


def _md_seed_indices(n: int, limit: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    if limit == 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, limit)})


def generate_configurations(seeds: Sequence[Atoms], calculator, settings: ConfigurationSettings | None = None,
                            progress: Callable[[str], None] | None = None) -> list[Atoms]:
    """Configurations from ``seeds`` (see module doc). ``calculator``: ASE calculator driving the teacher MD
    (``Teacher.calculator``); unused when ``md_steps`` is 0 or there are no temperatures."""
    settings = settings or ConfigurationSettings()
    if not seeds:
        raise ValueError("no seed structures given; pass at least one ase.Atoms")
    md_indices = set(_md_seed_indices(len(seeds), settings.md_seeds))
    out: list[Atoms] = []
    for i, seed in enumerate(seeds):
        if len(seed) == 0:
            raise ValueError(f"seed structure {i} has no atoms")
        if settings.include_seeds:
            out.append(_tagged(seed, "seed", i))
        rng = _rng(settings, seed, "rattle", 0)
        for c in range(settings.rattle_copies):
            atoms = _draw(lambda r, seed=seed: rattled(seed, settings.rattle_stdev, r), rng, settings.min_distance,
                          f"seed {i}, rattled copy {c}")
            out.append(_tagged(atoms, "rattle", i))
        if np.all(seed.pbc) and settings.strain_copies:
            rng = _rng(settings, seed, "strain", 0)
            for c in range(settings.strain_copies):
                atoms = _draw(lambda r, seed=seed: strained(seed, settings.max_strain, settings.strain_rattle, r),
                              rng, settings.min_distance, f"seed {i}, strained copy {c}")
                out.append(_tagged(atoms, "strain", i))
        if i in md_indices and settings.md_steps >= settings.md_interval:
            for temperature in settings.temperatures:
                if progress:
                    progress(f"teacher MD: seed {i}, {temperature:g} K, {settings.md_steps} steps")
                rng = _rng(settings, seed, "md", int(round(temperature * 1000)))
                frames = run_md_frames(md_cell(seed), calculator, temperature, settings.md_steps, settings.md_interval,
                                       settings.md_timestep, settings.md_friction, rng, settings.min_distance,
                                       label=f"teacher MD from seed {i}")
                out.extend(_tagged(a, "md", i, temperature, step) for step, a in frames)
    return out


def force_disagreement(student_forces: np.ndarray, teacher_forces: np.ndarray, metric: str = "max") -> float:
    """Disagreement (eV/Å) of two (n,3) force arrays: "max" = largest per-atom |dF|, "rms" = RMS component."""
    d = np.asarray(student_forces, np.float64) - np.asarray(teacher_forces, np.float64)
    if metric == "max":
        return float(np.sqrt(np.max(np.sum(d * d, axis=1)))) if len(d) else 0.0
    if metric == "rms":
        return float(np.sqrt(np.mean(d * d))) if d.size else 0.0
    raise ValueError(f"unknown disagreement metric {metric!r}; use 'max' or 'rms'")


def select_disagreeing(frames: Sequence[Atoms], student_forces: Sequence[np.ndarray],
                       teacher_forces: Sequence[np.ndarray], k: int, metric: str = "max") -> list[Atoms]:
    """The ``k`` frames where student and teacher forces (each (n,3) eV/Å) disagree most, most first.

    Returns copies (no calculator) with ``info["force_disagreement"]`` (eV/Å, see ``force_disagreement``) and
    ``info["frame_index"]`` (position in ``frames``); ties keep the input order.
    """
    if not len(frames) == len(student_forces) == len(teacher_forces):
        raise ValueError(f"got {len(frames)} frames, {len(student_forces)} student and {len(teacher_forces)} "
                         f"teacher force arrays; give one of each per frame")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores = []
    for i, (a, fs, ft) in enumerate(zip(frames, student_forces, teacher_forces)):
        if np.shape(fs) != (len(a), 3) or np.shape(ft) != (len(a), 3):
            raise ValueError(f"frame {i} has {len(a)} atoms but forces of shape {np.shape(fs)} (student) and "
                             f"{np.shape(ft)} (teacher); expected ({len(a)}, 3)")
        scores.append(force_disagreement(fs, ft, metric))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    picked = []
    for i in order:
        a = frames[int(i)].copy()
        a.calc = None
        a.info.update(force_disagreement=scores[int(i)], frame_index=int(i))
        picked.append(a)
    return picked
