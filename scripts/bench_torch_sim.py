"""MD throughput of N systems batched in torch-sim against an ASE loop over the same systems (issue 15, item 2).

Workload: NVT Langevin MD of N rattled copies of a small periodic cell (default: the 8-atom diamond Si cell,
a = 5.43 Å, rattle 0.05 Å, seed = copy index), 1 fs, 300 K, a model of the given preset with random weights
(speed does not depend on the weights). Both sides use the same model, dtype, threads and neighbor-list skin
(0.5 Å) and compute energy and forces (no stress: NVT does not use it):
  torch-sim  one state of N systems, ``FoundationTorchSimModel`` + ``torch_sim.nvt_langevin``: one model call
             per step for all N systems;
  ASE loop   for each system in turn, ``FoundationCalculator`` + ASE ``Langevin`` (``foundation.md``): N model
             calls per step.
Unit: atom-steps/s = (N x atoms per system x steps) / wall seconds of the timed steps (after --warmup untimed
steps on each side). The table gives the median over --repeats; the two sides alternate within each repeat
(A B, B A, ...) so that the load of a shared machine hits them alike, and the load average is printed.
Before timing, the first energies of both sides are compared (they must agree: same model, same graphs).

  python scripts/bench_torch_sim.py --systems 1 4 16 64 --steps 30 --threads 1
  python scripts/bench_torch_sim.py --quick          (smoke test: 1 and 2 systems, tiny model, a few steps)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", type=int, nargs="+", default=[1, 4, 16, 64], help="numbers of systems N")
    p.add_argument("--preset", default="student", help="model preset (random weights)")
    p.add_argument("--element", default="Si", help="element of the diamond cell (default Si, a=5.43 Å)")
    p.add_argument("--repeat-cell", type=int, nargs=3, default=[1, 1, 1], help="supercell of the 8-atom cell")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--steps", type=int, default=30, help="timed MD steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed MD steps before timing, each side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="smoke test: N = 1 2, 8 channels, 3 steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.systems, args.steps, args.warmup, args.repeats = [1, 2], 3, 1, 1
    if min(args.systems) < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--systems, --steps and --repeats must be positive")
    return args


def make_model(args):
    from foundation import FoundationModel, ModelConfig
    torch.manual_seed(0)
    extra = {"num_channels": 8, "radial_mlp": [8]} if args.quick else {}
    return FoundationModel(ModelConfig.preset(args.preset, elements=[args.element], **extra))


def systems(args, n: int) -> list[Atoms]:
    """n copies of the cell, each rattled with its own seed (0.05 Å)."""
    out = []
    for k in range(n):
        atoms = bulk(args.element, "diamond", a=5.43, cubic=True).repeat(tuple(args.repeat_cell))
        atoms.rattle(0.05, seed=k)
        out.append(atoms)
    return out


class TorchSimRun:
    """N systems in one torch-sim state, NVT Langevin at 300 K, 1 fs."""

    def __init__(self, model, structures, args):
        import torch_sim as ts

        from foundation.integrations.torch_sim import FoundationTorchSimModel
        dtype = getattr(torch, args.dtype)
        self.model = FoundationTorchSimModel(model, dtype=dtype, compute_stress=False)
        units = ts.units.MetalUnits
        self.kT = torch.tensor(300.0 * units.temperature, dtype=dtype)
        init, self.update = ts.nvt_langevin(model=self.model, dt=torch.tensor(0.001 * units.time, dtype=dtype),
                                            kT=self.kT, seed=0)
        self.state = init(ts.io.atoms_to_state(structures, torch.device("cpu"), dtype))
        self.first_energies = self.state.energy.double().numpy().copy()

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state = self.update(self.state, kT=self.kT)
        return time.perf_counter() - start


class AseLoop:
    """The same N systems, one ASE Langevin integrator and calculator each, advanced one system after the other."""

    def __init__(self, model, structures, args):
        from foundation.calculator import FoundationCalculator
        from foundation.md import initialize_velocities, make_dynamics
        self.dyns = []
        for k, atoms in enumerate(structures):
            atoms = atoms.copy()
            atoms.calc = FoundationCalculator(model, dtype=args.dtype, compute_stress=False)
            initialize_velocities(atoms, 300.0, seed=k)
            self.dyns.append(make_dynamics(atoms, "nvt", 1.0, 300.0, seed=k))
        self.first_energies = np.array([d.atoms.get_potential_energy() for d in self.dyns])

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for dyn in self.dyns:
            dyn.run(steps)
        return time.perf_counter() - start


def measure(args, model, n: int) -> dict:
    """Median atom-steps/s of both sides for N = n systems, and their first-energy agreement (eV)."""
    structures = systems(args, n)
    atoms_total = sum(len(a) for a in structures)
    runs = {"torch-sim": TorchSimRun(model, structures, args), "ase": AseLoop(model, structures, args)}
    diff = float(np.abs(runs["torch-sim"].first_energies - runs["ase"].first_energies).max())
    tol = 1e-8 if args.dtype == "float64" else 1e-3 * max(1, atoms_total // n)
    if diff > tol:
        raise RuntimeError(f"torch-sim and ASE energies differ by {diff:.3g} eV (> {tol:g}): not the same model")
    for run in runs.values():
        run.run(args.warmup)
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(runs[name].run(args.steps))
    speed = {name: atoms_total * args.steps / statistics.median(t) for name, t in times.items()}
    return {"systems": n, "atoms_per_system": atoms_total // n, "torch_sim_atom_steps_per_s": speed["torch-sim"],
            "ase_atom_steps_per_s": speed["ase"], "speedup": speed["torch-sim"] / speed["ase"],
            "first_energy_max_abs_diff_eV": diff,
            "neighbor_builds_torch_sim": runs["torch-sim"].model.neighbor_builds}


def table(rows: list[dict]) -> str:
    lines = ["| systems N | atoms/system | torch-sim (atom-steps/s) | ASE loop (atom-steps/s) | torch-sim / ASE |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['systems']} | {r['atoms_per_system']} | {r['torch_sim_atom_steps_per_s']:.0f} | "
                     f"{r['ase_atom_steps_per_s']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch_sim
    model = make_model(args)
    load_before = os.getloadavg()
    rows = []
    for n in args.systems:
        rows.append(measure(args, model, n))
        r = rows[-1]
        print(f"N={n}: torch-sim {r['torch_sim_atom_steps_per_s']:.0f}, ASE {r['ase_atom_steps_per_s']:.0f} "
              "atom-steps/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    meta = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "steps": args.steps,
            "repeats": args.repeats, "torch": torch.__version__, "torch_sim": getattr(torch_sim, "__version__", None)
            or _version("torch-sim-atomistic"), "load_average_before": load_before, "load_average_after": load_after,
            "cpu_count": os.cpu_count(), "parameters": model.num_parameters()}
    print(f"NVT Langevin MD, {args.element} diamond cells, preset {args.preset} ({meta['parameters']} parameters, "
          f"random weights), {args.dtype}, {args.threads} thread(s), {args.steps} steps x median of {args.repeats}")
    print(table(rows))
    print(f"load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
