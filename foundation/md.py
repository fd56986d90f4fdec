"""Molecular dynamics with a ``foundation`` model: the library behind ``foundation md``.

ASE integrators: NVE velocity Verlet, NVT Langevin, NPT isotropic Martyna–Tobias–Klein (Nosé–Hoover chains).
Writes an ASE trajectory and a text log (time ps, Etot/Epot/Ekin eV per atom, T K), with a committee
(``foundation.learn``) also ``LOG.devi``: the force deviation per frame (``DeviationLogger``), and reports speed as
ns/day and atom-steps/s (wall clock of the integration only, model loading excluded).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units

from . import keys

ENSEMBLES = ("nve", "nvt", "npt")


@dataclass
class MDSummary:
    """What a run did and how fast: steps, atoms, timestep (fs), wall time (s), speed, final energies (eV/atom)."""

    steps: int
    atoms: int
    timestep_fs: float
    wall_s: float
    ns_per_day: float
    atom_steps_per_s: float
    energy_drift_ev_per_atom: float  # |Etot(end) - Etot(start)| / N (meaningful for NVE)
    final_temperature_k: float
    trajectory: str | None
    log: str | None

    def __str__(self) -> str:
        return (f"{self.steps} steps x {self.atoms} atoms at {self.timestep_fs:g} fs in {self.wall_s:.2f} s: "
                f"{self.ns_per_day:.4g} ns/day, {self.atom_steps_per_s:.4g} atom-steps/s; final T "
                f"{self.final_temperature_k:.1f} K, |dEtot| {self.energy_drift_ev_per_atom:.3g} eV/atom"
                + (f"; trajectory {self.trajectory}" if self.trajectory else "")
                + (f", log {self.log}" if self.log else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def make_dynamics(atoms: Atoms, ensemble: str, timestep_fs: float, temperature_k: float, *,
                  friction_per_fs: float = 0.01, pressure_gpa: float = 0.0, seed: int = 0, logfile=None,
                  loginterval: int = 10):
    """The ASE integrator for ``ensemble`` (nve | nvt | npt) on ``atoms`` (calculator attached).

    nvt (Langevin) adds a ``FixCom`` constraint to ``atoms`` (ASE's recommended way to fix the centre of mass).
    """
    dt = timestep_fs * units.fs
    kw = {"logfile": logfile, "loginterval": loginterval}
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet
        return VelocityVerlet(atoms, timestep=dt, **kw)
    if ensemble == "nvt":
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin
        if not any(isinstance(c, FixCom) for c in atoms.constraints):  # centre of mass fixed the way ASE advises
            atoms.set_constraint([*atoms.constraints, FixCom()])
        return Langevin(atoms, timestep=dt, temperature_K=temperature_k, friction=friction_per_fs / units.fs,
                        fixcm=False, rng=np.random.default_rng(seed), **kw)
    if ensemble == "npt":
        if not atoms.pbc.all():
            raise ValueError("--ensemble npt needs a fully periodic structure (pbc on all three cell vectors)")
        from ase.md.nose_hoover_chain import IsotropicMTKNPT
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_k, pressure_au=pressure_gpa * units.GPa,
                               tdamp=100 * dt, pdamp=1000 * dt, **kw)
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


def initialize_velocities(atoms: Atoms, temperature_k: float, seed: int = 0) -> None:
    """Maxwell–Boltzmann momenta at ``temperature_k`` (K), zero total momentum (and rotation for molecules)."""
    from ase.md import velocitydistribution as vd
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution  # ase >= 3.29 / older
    thermalize(atoms, temperature_K=temperature_k, rng=np.random.default_rng(seed))
    vd.Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        vd.ZeroRotation(atoms)


class DeviationLogger:
    """Per frame of MD with a committee calculator, DP-GEN's model deviation: step, time (ps), max / min / mean
    over atoms of the force deviation (eV/Å), energy uncertainty (eV); one line per call, to ``path``."""

    def __init__(self, dyn, atoms: Atoms, path: Path):
        self.dyn, self.atoms, self.path = dyn, atoms, Path(path)
        self.path.write_text(f"# {'step':>8s} {'time_ps':>10s} {'max_devi_f':>12s} {'min_devi_f':>12s} "
                             f"{'avg_devi_f':>12s} {'energy_unc':>12s}\n")

    def __call__(self) -> None:
        calc = self.atoms.calc
        calc.get_property("forces", self.atoms)   # results of the current positions
        devi, res = calc.results[keys.FORCES_UNCERTAINTY], calc.results
        with self.path.open("a") as fh:
            fh.write(f"{self.dyn.nsteps:10d} {self.dyn.get_time() / (1000 * units.fs):10.4f} "
                     f"{res[keys.MAX_DEVI_F]:12.6f} {devi.min():12.6f} {devi.mean():12.6f} "
                     f"{res[keys.ENERGY_UNCERTAINTY]:12.6f}\n")


def run_md(atoms: Atoms, steps: int, temperature_k: float, ensemble: str = "nve", timestep_fs: float = 1.0, *,
           trajectory: str | Path | None = None, log: str | Path | None = None, interval: int = 10, seed: int = 0,
           friction_per_fs: float = 0.01, pressure_gpa: float = 0.0, init_velocities: bool = True) -> MDSummary:
    """Run ``steps`` MD steps on ``atoms`` (calculator attached); frames and log lines every ``interval`` steps."""
    if steps < 0 or interval < 1:
        raise ValueError(f"need steps >= 0 and interval >= 1 (got steps={steps}, interval={interval})")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
    for path in (log, trajectory):  # outputs may go into directories that do not exist yet
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if init_velocities:
        initialize_velocities(atoms, temperature_k, seed)
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_k, friction_per_fs=friction_per_fs,
                        pressure_gpa=pressure_gpa, seed=seed, logfile=None)
    if log is not None:
        from ase.md import MDLogger
        dyn.attach(MDLogger(dyn, atoms, str(log), header=True, stress=False, peratom=True, mode="w"),
                   interval=interval)
    if log is not None and keys.MAX_DEVI_F in getattr(atoms.calc, "implemented_properties", ()):  # a committee
        dyn.attach(DeviationLogger(dyn, atoms, Path(str(log) + ".devi")), interval=interval)
    traj = None
    if trajectory is not None:
        from ase.io.trajectory import Trajectory
        traj = Trajectory(str(trajectory), "w", atoms)
        dyn.attach(traj.write, interval=interval)
    n = len(atoms)
    e0 = atoms.get_total_energy()
    start = time.perf_counter()
    dyn.run(steps)
    wall = time.perf_counter() - start
    if traj is not None:
        traj.close()
    simulated_ns = steps * timestep_fs * 1e-6
    return MDSummary(steps=steps, atoms=n, timestep_fs=timestep_fs, wall_s=wall,
                     ns_per_day=simulated_ns / wall * 86400 if wall > 0 else float("inf"),
                     atom_steps_per_s=n * steps / wall if wall > 0 else float("inf"),
                     energy_drift_ev_per_atom=abs(atoms.get_total_energy() - e0) / n,
                     final_temperature_k=float(atoms.get_temperature()),
                     trajectory=str(trajectory) if trajectory else None, log=str(log) if log else None)


def md(model: str, structure: str | Path, steps: int, temperature_k: float, ensemble: str = "nve",
       timestep_fs: float = 1.0, *, trajectory: str | Path | None = None, log: str | Path | None = None,
       interval: int = 10, head: str | None = None, device: str = "cpu", dtype: str = "float64",
       revision: str | None = None, seed: int = 0, pressure_gpa: float = 0.0, friction_per_fs: float = 0.01,
       model_class: type | None = None, compile: bool = False) -> MDSummary:
    """``foundation md``: load ``model`` (Hub id or directory) and ``structure`` (any ASE-readable file, last
    frame), run MD, write ``trajectory`` (default STRUCTURE_STEM.md.traj) and ``log`` (default .md.log);
    ``compile``: the calculator's energy through ``torch.compile`` (``FoundationCalculator(compile=True)``)."""
    from .calculator import FoundationCalculator
    from .data.readers import read_atoms
    structure = Path(structure)
    if not structure.is_file():
        raise FileNotFoundError(f"structure file {structure} not found")
    (atoms,) = read_atoms(structure, -1)
    stem = structure.with_suffix("")
    trajectory = trajectory or f"{stem}.md.traj"
    log = log or f"{stem}.md.log"
    atoms.calc = FoundationCalculator.from_pretrained(model, head=head, device=device, dtype=dtype,
                                                      revision=revision, model_class=model_class, compile=compile)
    return run_md(atoms, steps, temperature_k, ensemble, timestep_fs, trajectory=trajectory, log=log,
                  interval=interval, seed=seed, pressure_gpa=pressure_gpa, friction_per_fs=friction_per_fs)
