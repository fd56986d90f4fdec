"""Throughput of our model against mace-torch at equal hyperparameters (issue 3, item 5).

Workloads (each for every preset / L, both models, same structures, threads, dtype and timing):
  cu_ef      inference, energy + forces, rattled 256-atom Cu fcc (4x4x4 conventional, a=3.61 Å, rattle 0.05 Å,
             seed 0), r_max from the config; unit atom-steps/s = atoms / (seconds per call)
  cu_efs     the same with stress
  asp_ef     inference, energy + forces, one aspirin frame (rMD17 file when present)
  asp_efs    the same with stress, the frame centred in a periodic 30 Å cube (no image within r_max)
  asp_train  training step on a batch of aspirin frames: forward with create_graph, loss
             mean((dE/N)^2) + mean(dF^2), backward, Adam step; unit structures/s
Timing: graphs (neighbour lists) are built once, outside the timed region, on both sides; each repeat runs
the call until at least --min-time seconds have passed and records seconds per call; the table shows the
median over --repeats after --warmup untimed calls (default 3: mace-torch's TorchScript-compiled e3nn
settles on the 3rd-4th call; --compiled: torch.compile's first call, untimed). A "paired" ratio is also
given: the median over adjacent (ours, mace) repeats of their time ratio. Random weights, zero reference
energies, no torch.compile on either side except in the --compiled column (foundation.integrations.compiled).

Both sides are timed alternately, repeat by repeat (A B, B A, ...), so the load of a shared machine hits
them alike; the load average is recorded. mace-torch runs in its own venv (scripts/setup_mace_venv.sh) as a
subprocess, `scripts/_mace_worker.py --serve`, driven over a pipe (one JSON command per line); the worker
imports the helpers of this file, which therefore imports nothing from `foundation` at module level.

  bash scripts/setup_mace_venv.sh /work/mace-venv
  python scripts/bench_model.py --mace-python /work/mace-venv/bin/python --threads 1 --json out.json
  python scripts/bench_model.py --quick --mace-python /work/mace-venv/bin/python     (smoke test, ~1 min)
  python scripts/profile_model.py --out prof.txt                                    (where our time goes)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list

WORKLOADS = ("cu_ef", "cu_efs", "asp_ef", "asp_train")
INFERENCE = ("cu_ef", "cu_efs", "asp_ef", "asp_efs")
UNITS = {**{w: "atom-steps/s" for w in INFERENCE}, "asp_train": "structures/s"}
SCRIPTS = Path(__file__).resolve().parent
DEFAULT_DATA = SCRIPTS.parents[0] / "data"
ASPIRIN_FILE = "rmd17/rmd17_aspirin_train_01.xyz.xz"


# --- structures (shared with the worker through JSON, so both sides see the same atoms) -----------------------
def copper_cell(seed: int = 0) -> Atoms:
    """Rattled 256-atom Cu fcc: 4x4x4 conventional cells, a=3.61 Å, Gaussian rattle stdev 0.05 Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    atoms.rattle(stdev=0.05, seed=seed)
    return atoms


def aspirin_frames(data_dir: Path, count: int) -> tuple[list[Atoms], str]:
    """``count`` aspirin frames spread over the rMD17 file (labels: energy eV, forces eV/Å), or a fallback.

    The fallback (no shared data) is benzene + acetic acid (20 atoms, H/C/O) rattled with seeds 0.., labelled
    with zero energy and forces: throughput does not depend on label values. Returns (frames, description).
    """
    path = Path(data_dir) / ASPIRIN_FILE
    if path.is_file():
        from foundation.data.readers import read_atoms
        frames = read_atoms(path, f"::{max(1, 1000 // count)}")[:count]
        out = [Atoms(a.numbers, a.positions) for a in frames]
        for a, b in zip(frames, out):
            b.info["energy"], b.arrays["forces"] = float(a.get_potential_energy()), np.array(a.get_forces())
        return out, f"rMD17 aspirin ({path.name}, {len(out[0])} atoms)"
    base, acid = molecule("C6H6"), molecule("CH3COOH")
    acid.translate([0.0, 0.0, 4.5])
    base += acid
    out = [Atoms(base.numbers, base.positions) for _ in range(count)]
    for seed, a in enumerate(out):
        a.rattle(stdev=0.05, seed=seed)
        a.info["energy"], a.arrays["forces"] = 0.0, np.zeros((len(a), 3))
    return out, f"fallback benzene+acetic acid ({len(base)} atoms; {path} not found)"


def atoms_to_json(atoms: Atoms) -> dict:
    """Plain-JSON record of a structure (Å, eV, eV/Å)."""
    rec = {"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
           "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist()}
    if "energy" in atoms.info:
        rec["energy"] = float(atoms.info["energy"])
        rec["forces"] = np.asarray(atoms.arrays["forces"]).tolist()
    return rec


def atoms_from_json(rec: dict) -> Atoms:
    """Inverse of ``atoms_to_json``; labels go to info["energy"] and arrays["forces"]."""
    atoms = Atoms(numbers=rec["numbers"], positions=rec["positions"], cell=rec["cell"], pbc=rec["pbc"])
    if "energy" in rec:
        atoms.info["energy"] = rec["energy"]
        atoms.arrays["forces"] = np.asarray(rec["forces"], dtype=float)
    return atoms


def boxed(atoms: Atoms, size: float = 30.0) -> Atoms:
    """A molecule centred in a periodic ``size`` Å cube: same neighbours as in vacuum when size - extent > r_max,
    so that a stress can be computed for it."""
    out = atoms.copy()
    out.set_cell(np.eye(3) * size)
    out.set_pbc(True)
    out.center()
    return out


def mean_neighbors(atoms: Atoms, r_max: float) -> float:
    """Mean number of neighbours closer than r_max (Å) per atom, the model's avg_num_neighbors."""
    return len(neighbor_list("i", atoms, r_max)) / len(atoms)


# --- timing ---------------------------------------------------------------------------------------------
def time_repeat(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call of ``fn``, calling it until ``min_time`` seconds have passed (at least once)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


class LocalRunner:
    """Runs the workloads of a request on ``side`` in this process, one timed repeat at a time.

    ``side`` has ``infer(atoms, stress, avg_num_neighbors)`` and ``train(frames, avg_num_neighbors)``, which
    build the model and graphs (untimed) and return a zero-argument step function, ``edges(atoms)`` and a
    ``params`` dict. The model's avg_num_neighbors is the mean neighbour count of the benchmarked
    structure(s) at the request's r_max.
    """

    def __init__(self, side):
        self.side, self.steps = side, {}

    def prepare(self, request: dict) -> dict:
        """Build every workload's step; return {workload: {count, atoms, edges}} and the parameter counts."""
        structs, r_max, info = request["structures"], request["hyper"]["r_max"], {}
        for name in request["workloads"]:
            if name in INFERENCE:
                atoms = atoms_from_json(structs["cu"] if name.startswith("cu") else structs["aspirin"][0])
                atoms = boxed(atoms) if name == "asp_efs" else atoms
                self.steps[name] = self.side.infer(atoms, name.endswith("_efs"), mean_neighbors(atoms, r_max))
                count = len(atoms)
            else:
                frames = [atoms_from_json(r) for r in structs["aspirin"][: request["batch_size"]]]
                atoms, count = frames[0], len(frames)
                avg = float(np.mean([mean_neighbors(a, r_max) for a in frames]))
                self.steps[name] = self.side.train(frames, avg)
            info[name] = {"count": count, "atoms": len(atoms), "edges": self.side.edges(atoms)}
        return {"workloads": info, "params": dict(self.side.params)}

    def warmup(self, name: str, calls: int) -> None:
        for _ in range(calls):
            self.steps[name]()

    def repeat(self, name: str, min_time: float) -> float:
        return time_repeat(self.steps[name], min_time)

    def evaluate(self, name: str) -> dict:
        """One call of an inference workload: {energy, forces[, stress]} as float64 lists (eV, eV/Å, eV/Å³)."""
        out = self.steps[name]()
        return {k: out[k].detach().double().reshape(-1).tolist() for k in ("energy", "forces", "stress")
                if out.get(k) is not None and (k != "stress" or name.endswith("_efs"))}


def interleaved(runners: dict, request: dict) -> dict:
    """Time each workload on every runner, alternating runners repeat by repeat (A B, B A, ...) so that the
    load of a shared machine hits both sides alike. Returns {side: {workload: results}}."""
    timing, names = request["timing"], list(runners)
    infos = {side: r.prepare(request) for side, r in runners.items()}
    out = {side: {"params": infos[side]["params"], "versions": infos[side].get("versions")} for side in names}
    for w in request["workloads"]:
        per_call = {side: [] for side in names}
        for side in names:
            runners[side].warmup(w, timing["warmup"])
        for i in range(timing["repeats"]):
            for side in (names if i % 2 == 0 else names[::-1]):
                per_call[side].append(runners[side].repeat(w, timing["min_time"]))
        if len(names) >= 2:  # median over adjacent (ours, mace) repeats of mace's time / ours: robust to load drift
            a, b = per_call[names[0]], per_call["mace" if "mace" in names else names[1]]
            out[names[0]][w + "_paired_ratio"] = statistics.median(tb / ta for ta, tb in zip(a, b))
        for side in names:
            med, info = statistics.median(per_call[side]), infos[side]["workloads"][w]
            out[side][w] = {"median_s": med, "per_call_s": per_call[side], "throughput": info["count"] / med,
                            "unit": UNITS[w], "atoms": info["atoms"], "edges": info["edges"]}
    return out


def training_loss(energy: torch.Tensor, forces: torch.Tensor, ref_energy: torch.Tensor,
                  ref_forces: torch.Tensor, natoms: torch.Tensor) -> torch.Tensor:
    """mean(((E - E_ref)/N)^2) + mean((F - F_ref)^2); energy (B,) eV, forces (n,3) eV/Å, natoms (B,)."""
    return (((energy - ref_energy) / natoms) ** 2).mean() + ((forces - ref_forces) ** 2).mean()


# --- our model ------------------------------------------------------------------------------------------
class OursSide:
    """Our ``FoundationModel`` from ``ModelConfig.preset(preset, elements=..., **overrides)`` in ``dtype``."""

    def __init__(self, preset: str, overrides: dict, dtype: str):
        self.preset, self.overrides, self.dtype = preset, dict(overrides), dtype
        self.params: dict[str, int] = {}

    def config(self, elements: list[str], avg_num_neighbors: float = 1.0):
        from foundation import ModelConfig
        return ModelConfig.preset(self.preset, elements=elements, dtype=self.dtype,
                                  avg_num_neighbors=float(avg_num_neighbors), **self.overrides)

    def model(self, frames: list[Atoms], avg_num_neighbors: float):
        """A randomly initialised model for the elements of ``frames``, and their batched graphs."""
        from torch_geometric.data import Batch

        from foundation import FoundationModel
        from foundation.data import from_atoms
        elements = sorted({s for a in frames for s in a.get_chemical_symbols()})
        config = self.config(elements, avg_num_neighbors)
        model = FoundationModel(config).to(getattr(torch, self.dtype))
        self.params["+".join(elements)] = sum(p.numel() for p in model.parameters())
        dtype = getattr(torch, self.dtype)
        return model, Batch.from_data_list([from_atoms(a, config.r_max, dtype=dtype) for a in frames])

    def edges(self, atoms: Atoms) -> int:
        from foundation.data import from_atoms
        r_max = self.config(sorted(set(atoms.get_chemical_symbols()))).r_max
        return int(from_atoms(atoms, r_max).edge_index.shape[1])

    def infer(self, atoms: Atoms, stress: bool, avg_num_neighbors: float) -> Callable[[], object]:
        model, batch = self.model([atoms], avg_num_neighbors)
        model.eval()
        return lambda: model(batch, compute_forces=True, compute_stress=stress, training=False)

    def train(self, frames: list[Atoms], avg_num_neighbors: float) -> Callable[[], object]:
        from foundation import keys
        model, batch = self.model(frames, avg_num_neighbors)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        natoms = batch[keys.NATOMS].to(getattr(torch, self.dtype))

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(batch, compute_forces=True, training=True)
            loss = training_loss(out[keys.ENERGY], out[keys.FORCES], batch[keys.ENERGY], batch[keys.FORCES], natoms)
            loss.backward()
            opt.step()
        return step


# --- driver ---------------------------------------------------------------------------------------------
HYPER_FIELDS = ("num_channels", "max_L", "max_ell", "num_layers", "correlation", "r_max", "num_bessel",
                "num_poly_cutoff", "radial_mlp", "readout_mlp")


def hyperparameters(config) -> dict:
    """The fields of our ``ModelConfig`` that the mace-torch side must match (JSON-able)."""
    missing = [f for f in HYPER_FIELDS if not hasattr(config, f)]
    if missing:
        raise ValueError(f"ModelConfig has no field(s) {missing}; bench_model.py needs them to build the "
                         "equivalent mace-torch model: update HYPER_FIELDS to the new names")
    hyper = {f: getattr(config, f) for f in HYPER_FIELDS}
    hyper["radial_mlp"] = list(hyper["radial_mlp"])
    return hyper


def source_state() -> str:
    """Commit of the repository and whether foundation/ has uncommitted edits (what was benchmarked)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(SCRIPTS), *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", str(SCRIPTS.parent / "foundation"))
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted edits in foundation/" if dirty else "")


def cases(presets: list[str], Ls: list[int] | None) -> list[tuple[str, dict]]:
    """(preset, overrides) pairs: each preset at its own max_L, or at every L of ``Ls``."""
    return [(p, {}) for p in presets] if not Ls else [(p, {"max_L": L}) for p in presets for L in Ls]


def fmt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")


def print_table(rows: list[dict], file=sys.stdout) -> None:
    """One line per (case, workload): ours, mace, ours/mace of the medians (>1: we are faster), and the
    median of the per-repeat ratios of adjacent (ours, mace) repeats."""
    head = (f"{'preset':<8} {'L':>2} {'workload':<10} {'ours':>10} {'mace':>10} {'ratio':>7} {'paired':>7} "
            f"{'script':>10} {'s/mace':>7} {'compiled':>10} {'c/mace':>7}  unit")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        ratio = f"{r['ours'] / r['mace']:.2f}x" if r.get("mace") and r.get("ours") else "-"
        paired = f"{r['paired']:.2f}x" if r.get("paired") else "-"
        script = f"{r['script'] / r['mace']:.2f}x" if r.get("mace") and r.get("script") else "-"
        comp = f"{r['compiled'] / r['mace']:.2f}x" if r.get("mace") and r.get("compiled") else "-"
        print(f"{r['preset']:<8} {r['L']:>2} {r['workload']:<10} {fmt(r.get('ours')):>10} "
              f"{fmt(r.get('mace')):>10} {ratio:>7} {paired:>7} {fmt(r.get('script')):>10} {script:>7} "
              f"{fmt(r.get('compiled')):>10} {comp:>7}  {r['unit']}",
              file=file)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--presets", default="small,medium,large", help="comma-separated ModelConfig presets")
    p.add_argument("--L", default=None, help="comma-separated max_L overrides (default: each preset's own)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    p.add_argument("--mace-python", default=None, help="python of a mace-torch venv (setup_mace_venv.sh)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (e3nn 0.4.4 TorchScript needs ~3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per repeat (at least one call)")
    p.add_argument("--batch-size", type=int, default=5, help="aspirin frames per training step")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="shared data folder (rmd17/ inside)")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 channels, 1 repeat, no min time")
    p.add_argument("--json", default=None, help="write all results and metadata to this JSON file")
    p.add_argument("--mace-reduced-cg", action="store_true", help="mace use_reduced_cg=True (CLI default False)")
    p.add_argument("--artifact", action="store_true", help="also time the TorchScript artifact (column 'script'; "
                                                           "inference workloads only)")
    p.add_argument("--compiled", action="store_true", help="also time foundation.integrations.compiled (torch.compile, "
                                                           "column 'compiled'; inference only; compile untimed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"num_channels": 8} if args.quick else {}
    timing = ({"warmup": 3, "repeats": 1, "min_time": 0.0} if args.quick else
              {"warmup": args.warmup, "repeats": args.repeats, "min_time": args.min_time})
    frames, asp_desc = aspirin_frames(Path(args.data_dir), args.batch_size)
    structures = {"cu": atoms_to_json(copper_cell()), "aspirin": [atoms_to_json(a) for a in frames]}
    Ls = [int(x) for x in args.L.split(",")] if args.L else None
    report = {"aspirin": asp_desc, "threads": args.threads, "dtype": args.dtype, "timing": timing,
              "neighbor_list": "excluded (graphs built once before timing, both sides)", "cases": [],
              "source": source_state()}
    print(f"# foundation {report['source']}; threads {args.threads}, {args.dtype}, aspirin: {asp_desc}; "
          f"neighbour lists excluded from timing; median of {timing['repeats']} repeats", flush=True)
    rows = []
    for preset, extra in cases(args.presets.split(","), Ls):
        side = OursSide(preset, {**overrides, **extra}, args.dtype)
        hyper = hyperparameters(side.config(["H", "C", "O"]))
        request = {"hyper": hyper, "structures": structures, "workloads": args.workloads.split(","),
                   "timing": timing, "threads": args.threads, "dtype": args.dtype, "batch_size": args.batch_size,
                   "mace_reduced_cg": args.mace_reduced_cg}
        torch.manual_seed(0)
        case = {"preset": preset, "hyper": hyper, "load_before": os.getloadavg()}
        runners = {"ours": LocalRunner(side)}
        if args.artifact:
            from _artifact_side import ScriptSide
            runners["script"] = LocalRunner(ScriptSide(preset, {**overrides, **extra}, args.dtype))
        if args.compiled:
            from _artifact_side import CompiledSide
            runners["compiled"] = LocalRunner(CompiledSide(preset, {**overrides, **extra}, args.dtype))
        if args.mace_python:
            from _mace_worker import WorkerClient  # scripts/ is on sys.path: this file's folder
            runners["mace"] = WorkerClient(args.mace_python, args.threads)
        try:
            case.update(interleaved(runners, request))
        finally:
            if "mace" in runners:
                runners["mace"].close()
        case["load_after"] = os.getloadavg()
        if args.compiled:
            from _artifact_side import CompiledSide
            case["compile_s"] = CompiledSide.compile_s.get(preset)
        report["cases"].append(case)
        for w in request["workloads"]:
            rows.append({"preset": preset, "L": hyper["max_L"], "workload": w, "unit": UNITS[w],
                         "ours": case["ours"][w]["throughput"],
                         "mace": case.get("mace", {}).get(w, {}).get("throughput"),
                         "paired": case["ours"].get(w + "_paired_ratio"),
                         "script": case.get("script", {}).get(w, {}).get("throughput"),
                         "compiled": case.get("compiled", {}).get(w, {}).get("throughput")})
        print(f"{preset} L={hyper['max_L']}: params ours {case['ours']['params']}, mace "
              f"{case.get('mace', {}).get('params', '-')}; load {case['load_before']} -> {case['load_after']}"
              + (f"; compile {case['compile_s']:.0f} s" if case.get("compile_s") else ""),
              flush=True)
    print()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
