"""Speed of an imported MACE-MP-0 medium model against mace-torch running the same weights (issue 14, item 6).

    .venv/bin/python scripts/bench_mace_speed.py --mace-python /work/mace-venv/bin/python \\
        --threads 1,2 --dtypes float32 --json docs/benchmarks/mace_speed.json

1. Under the mace venv, `scripts/_mace_worker.py --build-mp0 DIR` builds a random-weight MACE-MP-0 medium
   (ScaleShiftMACE, 128x0e+128x1o, residual blocks, 2 layers, correlation 3, max_ell 3, r_max 6 Å, 10 Bessel,
   radial MLP [64, 64, 64], readout 16x0e; 89 elements H..Ac; random E0s, scale, shift) in float64, saves it
   as a .model file and dumps it with foundation/interop/mace_dump.py (`--dump DIR --mace-model FILE` reuse one).
2. Here the dump is imported with ``foundation.interop.mace`` (read_dump + build_model): the same weights.
3. Both codes are timed on the same structures with bench_model.py's harness (LocalRunner here, WorkerClient for
   the mace worker, which loads the saved .model and casts it to the dtype, as mace's calculator does):
     cu_ef / cu_efs    rattled 256-atom Cu fcc (4x4x4 conventional, periodic), E+F / E+F+stress
     asp_ef / asp_efs  first frame of data/rmd17/rmd17_aspirin_train_01.xyz.xz (21 atoms), E+F in vacuum /
                       E+F+stress centred in a periodic 30 Å cube (no periodic image within r_max)
   at each --threads and --dtypes, repeats alternating between the two codes (A B, B A, ...), median and
   min-max over --repeats after --warmup untimed calls. Neighbour lists are built once before timing on both
   sides (excluded from the timed region): a call is the model's forward + force/stress backward only.
   Before timing, each workload is evaluated once on both sides: max |ours - mace| per quantity must be within
   tol x max(1, max |mace|) (tol 1e-5 float32, 1e-8 float64), else the script stops (not the same function).
The load average (1 min) is recorded before and after every block: on a shared machine the absolute rates are
depressed, and the 2-thread numbers are only meaningful when the load leaves two cores free.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_model import (  # noqa: E402
    DEFAULT_DATA,
    UNITS,
    LocalRunner,
    atoms_to_json,
    copper_cell,
    interleaved,
    source_state,
)

WORKLOADS = ("cu_ef", "cu_efs", "asp_ef", "asp_efs")
LABELS = {"cu_ef": "Cu 256 E+F", "cu_efs": "Cu 256 E+F+S", "asp_ef": "aspirin E+F", "asp_efs": "aspirin E+F+S"}
TOL = {"float32": 1e-5, "float64": 1e-8}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ImportedSide:
    """The imported model (``foundation.interop.mace``) for bench_model's ``LocalRunner``: inference only."""

    def __init__(self, dump: str | Path, dtype: str):
        from foundation.interop.mace import build_model, read_dump
        self.dtype = DTYPES[dtype]
        self.net = build_model(*read_dump(dump)).to(self.dtype).eval()
        self.r_max = float(self.net.config.r_max)
        self.params = {"imported": sum(p.numel() for p in self.net.parameters())}

    def graph(self, atoms):
        from foundation.data import from_atoms
        return from_atoms(atoms, self.r_max, with_labels=False, dtype=self.dtype)

    def edges(self, atoms) -> int:
        return int(self.graph(atoms).edge_index.shape[1])

    def infer(self, atoms, stress: bool, avg_num_neighbors: float):
        """Step function: one forward with forces (and stress); the model's own avg_num_neighbors is kept."""
        from foundation.data.loader import collate
        batch = collate([self.graph(atoms)])
        return lambda: self.net(batch, compute_forces=True, compute_stress=stress, training=False)

    def train(self, frames, avg_num_neighbors: float):
        raise NotImplementedError("bench_mace_speed times inference only")


def deviation(ours: dict, mace: dict, tol: float) -> dict:
    """{quantity: [max |ours - mace|, max |mace|, their ratio, within tol x max(1, max |mace|)]} over the
    quantities both gave (eV, eV/Å, eV/Å³)."""
    out = {}
    for q in ("energy", "forces", "stress"):
        if q in ours and q in mace:
            a, b = np.asarray(ours[q], dtype=float), np.asarray(mace[q], dtype=float)
            dev, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
            out[q] = [dev, scale, dev / scale if scale else 0.0, bool(dev <= tol * max(1.0, scale))]
    return out


def aspirin(data_dir: Path):
    """First frame of the rMD17 aspirin training file (read_atoms), as an unlabelled molecule."""
    from ase import Atoms

    from foundation.data.readers import read_atoms
    path = Path(data_dir) / "rmd17" / "rmd17_aspirin_train_01.xyz.xz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data-dir (the folder holding rmd17/)")
    frame = read_atoms(path, 0)[0]
    return Atoms(frame.numbers, frame.positions)


def build_mace_model(mace_python: str, out: Path) -> dict:
    """Run ``_mace_worker.py --build-mp0 OUT`` in the mace venv: {model_file, dump, params, hyper}."""
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([mace_python, str(SCRIPTS / "_mace_worker.py"), "--build-mp0", str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the mace model failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(per_call: list[float], count: int) -> list[float]:
    """[min, max] throughput over the repeats (count / seconds per call)."""
    return [count / max(per_call), count / min(per_call)]


def rows_of(block: dict, workloads: list[str]) -> list[dict]:
    """Table rows of one (threads, dtype) block of interleaved() results."""
    rows = []
    for w in workloads:
        ours, mace = block["ours"][w], block.get("mace", {}).get(w)
        count = ours["atoms"]
        rows.append({"threads": block["threads"], "dtype": block["dtype"], "workload": w, "atoms": count,
                     "ours": ours["throughput"], "ours_range": spread(ours["per_call_s"], count),
                     "mace": mace["throughput"] if mace else None,
                     "mace_range": spread(mace["per_call_s"], count) if mace else None,
                     "paired": block["ours"].get(w + "_paired_ratio"),
                     "load": [block["load_before"][0], block["load_after"][0]]})
    return rows


def _rate(x: float | None, rng: list[float] | None) -> str:
    if x is None:
        return "–"
    d = 1 if x < 1000 else 0
    return f"{x:.{d}f} ({rng[0]:.{d}f}–{rng[1]:.{d}f})"


def format_table(rows: list[dict]) -> str:
    """Markdown table: median atom-steps/s (min–max over repeats), ratio of medians (ours / mace; >1 means
    ours is faster), median of the paired per-repeat ratios (mace time / ours time), load average before -> after."""
    lines = ["| workload | threads | dtype | ours (atom-steps/s) | mace-torch (atom-steps/s) | ratio | paired | "
             "load 1 min |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ours'] / r['mace']:.2f}×" if r.get("mace") else "–"
        paired = f"{r['paired']:.2f}×" if r.get("paired") else "–"
        lines.append(f"| {LABELS[r['workload']]} | {r['threads']} | {r['dtype']} | "
                     f"{_rate(r['ours'], r['ours_range'])} | "
                     f"{_rate(r.get('mace'), r.get('mace_range'))} | {ratio} | {paired} | "
                     f"{r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mace-python", default=None, help="python of a mace-torch venv (without it: ours only)")
    p.add_argument("--dump", default=None, help="mace dump directory to import (default: build one with the venv)")
    p.add_argument("--mace-model", default=None, help="the .model file of --dump, for the mace side")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (both sides)")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32 (mace_mp's default), float64")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (e3nn 0.4.4 TorchScript needs ~3)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per repeat (at least one call)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="shared data folder (rmd17/ inside)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 1 repeat, no min time")
    p.add_argument("--json", default=None, help="write all results and metadata to this JSON file")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    args.dtypes = args.dtypes.split(",")
    args.workloads = args.workloads.split(",")
    bad = [w for w in args.workloads if w not in WORKLOADS] + [d for d in args.dtypes if d not in TOL]
    if bad:
        p.error(f"unknown workload/dtype {bad}: workloads {WORKLOADS}, dtypes {tuple(TOL)}")
    if not args.mace_python and not args.dump:
        p.error("pass --mace-python (builds the model and times mace-torch too) or --dump DIR (ours only)")
    if args.mace_python and args.dump and not args.mace_model:
        p.error("--dump with --mace-python needs --mace-model FILE (the .model file the dump was made from)")
    return args


def run(args, tmp: Path) -> dict:
    if args.dump:
        made = {"model_file": args.mace_model, "dump": args.dump, "params": None, "hyper": "from --dump"}
    else:
        made = build_mace_model(args.mace_python, tmp)
    timing = ({"warmup": 1, "repeats": 1, "min_time": 0.0} if args.quick else
              {"warmup": args.warmup, "repeats": args.repeats, "min_time": args.min_time})
    structures = {"cu": atoms_to_json(copper_cell()), "aspirin": [atoms_to_json(aspirin(Path(args.data_dir)))]}
    report = {"source": source_state(), "model": made, "timing": timing, "cpus": os.cpu_count(),
              "neighbor_list": "excluded (graphs built once before timing, both sides)",
              "aspirin": "rMD17 aspirin train_01 frame 0; asp_efs in a periodic 30 Å cube", "blocks": [], "rows": []}
    print(f"# foundation {report['source']}; model {made['model_file'] or made['dump']} ({made['params']} params); "
          f"neighbour lists excluded; median of {timing['repeats']} repeats", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        client = None
        if args.mace_python:
            from _mace_worker import WorkerClient
            client = WorkerClient(args.mace_python, threads)
        try:
            for dtype in args.dtypes:
                request = {"hyper": {"r_max": 6.0}, "structures": structures, "workloads": args.workloads,
                           "timing": timing, "threads": threads, "dtype": dtype, "model_file": made["model_file"]}
                runners = {"ours": LocalRunner(ImportedSide(made["dump"], dtype))}
                if client:
                    runners["mace"] = client
                block = {"threads": threads, "dtype": dtype}
                if client:  # first: the same function on both sides? (interleaved() prepares again)
                    for r in runners.values():
                        r.prepare(request)
                    block["check"] = {w: deviation(runners["ours"].evaluate(w), client.evaluate(w), TOL[dtype])
                                      for w in args.workloads}
                    if not all(v[-1] for d in block["check"].values() for v in d.values()):
                        report["blocks"].append(block)
                        print(f"threads {threads} {dtype}: outside tolerance, not timed: {block['check']}")
                        continue
                block["load_before"] = os.getloadavg()
                block.update(interleaved(runners, request))
                block["load_after"] = os.getloadavg()
                report["blocks"].append(block)
                report["rows"] += rows_of(block, args.workloads)
                print(f"threads {threads} {dtype}: load {block['load_before'][0]:.1f} -> "
                      f"{block['load_after'][0]:.1f}; max dev {block.get('check', '-')}", flush=True)
        finally:
            if client:
                client.close()
    report["units"] = {w: UNITS[w] for w in args.workloads}
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_mace_speed.") as tmp:
        report = run(args, Path(tmp))
    print()
    print(format_table(report["rows"]))
    bad = {(b["threads"], b["dtype"], w): d for b in report["blocks"] for w, d in b.get("check", {}).items()
           if not all(v[-1] for v in d.values())}
    report["same_function"] = not bad
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if bad:
        print(f"NOT THE SAME FUNCTION (outside tolerance): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
