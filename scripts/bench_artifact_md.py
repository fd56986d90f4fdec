"""Student MD speed on 64-atom Si: compiled, TorchScript and eager student vs SevenNet-0, in one run (issue 15).

NVE (ASE VelocityVerlet through ``foundation.md.run_md``, 1 fs, 300 K start) on the rattled 64-atom diamond-Si cell
(2x2x2 conventional, a = 5.43 Å), with three calculators alternated run by run so the machine's load hits them alike:
SevenNet-0 (``sevenn``'s ``SevenNetCalculator("7net-0")``), the ``student`` preset as ``FoundationCalculator`` and the
same model's TorchScript artifact behind a minimal ASE calculator with the same skin neighbour list
(``_artifact_side.ArtifactCalculator``), and ``FoundationCalculator(compile=True)`` (inductor; its compile happens in
the untimed warm-up). The student has random weights: speed does not depend on their values.
Reports best and median atom-steps/s over the repeats, the ratios to SevenNet-0, threads and the load average.

  python scripts/bench_artifact_md.py --threads 1 --steps 20 --repeats 3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).resolve().parent))


def silicon64():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.02, seed=0)
    return atoms


def calculators(dtype: str) -> dict:
    """name -> ASE calculator: SevenNet-0, the eager student, its artifact and its torch.compile'd energy
    (``FoundationCalculator(compile=True)``), float32 or float64."""
    from _artifact_side import ArtifactCalculator
    from ase.neighborlist import neighbor_list
    from sevenn.calculator import SevenNetCalculator

    from foundation import FoundationModel, ModelConfig
    from foundation.calculator import FoundationCalculator
    from foundation.integrations.artifact import build_artifact
    atoms = silicon64()
    avg = len(neighbor_list("i", atoms, 5.0)) / len(atoms)
    torch.manual_seed(0)
    student = FoundationModel(ModelConfig.preset("student", elements=["Si"], avg_num_neighbors=avg))
    return {"sevennet0": SevenNetCalculator("7net-0", device="cpu"),
            "student_eager": FoundationCalculator(student, dtype=dtype),
            "student_script": ArtifactCalculator(build_artifact(student, dtype=dtype)),
            "student_compiled": FoundationCalculator(student, dtype=dtype, compile=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from foundation.md import run_md
    calcs = calculators(args.dtype)
    load_before = os.getloadavg()
    runs = {name: [] for name in calcs}
    for calc in calcs.values():  # warm-up: first calls compile (TorchScript, inductor) and build lists
        work = silicon64()
        work.calc = calc
        run_md(work, 3, 300.0, "nve", seed=0)
    for r in range(args.repeats):
        for name in (list(calcs) if r % 2 == 0 else list(calcs)[::-1]):
            work = silicon64()
            work.calc = calcs[name]
            runs[name].append(run_md(work, args.steps, 300.0, "nve", seed=r).atom_steps_per_s)
    load_after = os.getloadavg()
    ref, ref_median = max(runs["sevennet0"]), statistics.median(runs["sevennet0"])
    print(f"# 64-atom Si NVE, {args.steps} steps x {args.repeats} alternated repeats, {args.threads} thread(s), "
          f"{args.dtype}; load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'calculator':<16} {'best':>9} {'median':>9} {'best/7net-0':>12} {'median/7net-0':>14}  atom-steps/s")
    for name, values in runs.items():
        best, median = max(values), statistics.median(values)
        print(f"{name:<16} {best:>9.1f} {median:>9.1f} {best / ref:>11.1f}x {median / ref_median:>13.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "threads": args.threads, "steps": args.steps,
                                               "dtype": args.dtype, "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
