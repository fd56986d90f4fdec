"""Benchmark the data layer: conversion rate, read rate with and without neighbor lists, bytes on disk.

Runs on data/ (mlearn Si_train, rMD17 aspirin) when present, else on generated EMT-labelled data
(or on the files given with --files). One process, one thread; prints medians over --repeats runs of wall-clock
and of process CPU time.

    python scripts/bench_data.py [--files A.xyz B.xyz] [--repeats 5] [--r-max 5.0] [--read-limit 1000]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "data"
DEFAULT_FILES = [SHARED / "mlearn" / "Si_train.xyz.xz", SHARED / "rmd17" / "rmd17_aspirin_train_01.xyz.xz"]


def generated_files(directory: Path) -> list[Path]:
    """Fallback inputs: 300 rattled 21-atom molecules and 200 rattled 32-atom Cu cells, labelled by ASE EMT."""
    import ase.io
    from ase.build import bulk, molecule
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    def label(atoms):
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    rng = np.random.default_rng(0)
    mols, cells = [], []
    for k in range(300):
        m = molecule("C6H6") + molecule("CH3CH2OH")  # 21 atoms, two molecules 6 Å apart
        m.positions[12:] += [6.0, 0.0, 0.0]
        m.rattle(0.05, seed=k)
        mols.append(label(m))
    for k in range(200):
        c = bulk("Cu", "fcc", a=3.6 + rng.normal(scale=0.03), cubic=True).repeat(2)
        c.rattle(0.05, seed=k)
        cells.append(label(c))
    paths = [directory / "generated_molecules_21.xyz", directory / "generated_cu32.xyz"]
    ase.io.write(paths[0], mols)
    ase.io.write(paths[1], cells)
    return paths


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median CPU (process) seconds of ``fn()`` over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _rates(count: int, seconds: tuple[float, float]) -> str:
    return f"{count / seconds[0]:,.0f} | {count / seconds[1]:,.0f}"


def bench_file(path: Path, work: Path, repeats: int, r_max: float, read_limit: int, shard_size: int) -> dict:
    from foundation.data import ShardedDataset
    from foundation.data.convert import convert
    from foundation.data.manifest import read_manifest

    runs = iter(range(1000))

    def convert_once():
        convert([path], work / f"{path.stem}-{next(runs)}", shard_size=shard_size, r_max=r_max, progress=False)

    conv = _timed(convert_once, max(1, repeats // 2 + 1))
    out = work / f"{path.stem}-0"
    manifest = read_manifest(out)
    n = manifest["num_structures"]
    row = {"file": path.name, "structures": n, "atoms/structure": manifest["num_atoms"] / n,
           "bytes/atom": sum(s["bytes"] for s in manifest["shards"]) / manifest["num_atoms"],
           "convert /s": _rates(n, conv)}
    order = [int(i) for i in np.random.default_rng(0).permutation(n)[:read_limit]]
    for label, radius in (("read /s (no NL)", None), (f"read /s (NL {r_max:g} Å)", r_max)):
        ds = ShardedDataset(out, r_max=radius)
        ds[0]
        row[label] = _rates(len(order), _timed(lambda ds=ds: [ds[i] for i in order], repeats))
    ds = ShardedDataset(out)
    row["decode-only /s"] = _rates(len(order), _timed(lambda: [ds.record(i) for i in order], repeats))
    return row


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    cells = [[f"{r[c]:,.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", type=Path, default=None,
                        help="inputs to benchmark (default: data/ Si_train and aspirin, else generated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--r-max", type=float, default=5.0, help="neighbor-list cutoff in Å (default 5)")
    parser.add_argument("--read-limit", type=int, default=1000, help="structures read per timed pass")
    parser.add_argument("--shard-size", type=int, default=10000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        files = args.files or [f for f in DEFAULT_FILES if f.is_file()] or generated_files(work)
        rows = [bench_file(f, work, args.repeats, args.r_max, args.read_limit, args.shard_size) for f in files]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"structures per second, 'wall | CPU' (CPU = per process-CPU-second, robust to a loaded machine); "
          f"medians of {args.repeats} repeats (conversion: {args.repeats // 2 + 1}), 1 process, 1 thread")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
