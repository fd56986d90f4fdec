"""Live exactness check of ``foundation import mace`` against mace-torch, every family, in one run.

    .venv/bin/python scripts/bench_mace_import.py --mace-python /work/mace-venv/bin/python [--fixtures DIR]

Without ``--fixtures`` it first runs scripts/make_mace_fixtures.py under the mace venv into a temporary folder
(fresh random-weight models, dumps and mace ``MACECalculator`` references), then imports each dump here and
prints the families table's last column: max |ours - mace| per quantity (energy eV, forces eV/Å, stress
eV/Å³) over the triclinic cell, the Cu-Au cell, the molecule and the mixed batch, and the tolerance test
(1e-8 x max(1, max |mace|) in float64, 1e-5 in float32). With ``--fixtures DIR`` it checks existing dumps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from foundation import keys
from foundation.calculator import FoundationCalculator
from foundation.data.graph import from_atoms
from foundation.data.loader import collate
from foundation.interop.mace import build_model, read_dump

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-8, "float32": 1e-5}


def _atoms(s: dict) -> Atoms:
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


def deviations(dump: Path) -> dict:
    """{quantity: (max deviation, max |mace|)} of one family over its structures and the batch."""
    model = build_model(*read_dump(dump))
    ref = json.loads((dump / "reference.json").read_text())
    dev = {"energy": [0.0, 0.0], "forces": [0.0, 0.0], "stress": [0.0, 0.0]}

    def add(q, ours, theirs):
        ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
        dev[q][0] = max(dev[q][0], float(np.abs(ours - theirs).max()))
        dev[q][1] = max(dev[q][1], float(np.abs(theirs).max()))
    calc = FoundationCalculator(model, head=ref["head"], dtype=ref["dtype"])
    for s in ref["structures"].values():
        atoms = _atoms(s)
        atoms.calc = calc
        add("energy", atoms.get_potential_energy(), s["energy"])
        add("forces", atoms.get_forces(), s["forces"])
        if atoms.pbc.any():
            add("stress", atoms.get_stress(voigt=False), s["stress"])
    head = model.config.heads.index(ref["head"]) if ref["head"] else 0
    dtype = {"float64": torch.float64, "float32": torch.float32}[ref["dtype"]]
    graphs = [from_atoms(_atoms(ref["structures"][n]), model.config.r_max, with_labels=False, head=head, dtype=dtype)
              for n in ref["batch"]["order"]]
    out = model.to(dtype)(collate(graphs), compute_stress=True)
    periodic = [k for k, n in enumerate(ref["batch"]["order"]) if any(ref["structures"][n]["pbc"])]
    add("energy", out[keys.ENERGY].numpy(), ref["batch"]["energy"])
    add("forces", out[keys.FORCES].numpy(), ref["batch"]["forces"])
    add("stress", out[keys.STRESS].numpy()[periodic], np.asarray(ref["batch"]["stress"])[periodic])
    return {"dtype": ref["dtype"], **{q: tuple(v) for q, v in dev.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mace-python", default=None, help="python of a mace-torch venv (live run)")
    parser.add_argument("--fixtures", default=None, help="check these dumps instead of making fresh ones")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.fixtures) if args.fixtures else Path(tmp)
        if not args.fixtures:
            if not args.mace_python:
                parser.error("pass --mace-python (live run) or --fixtures DIR")
            subprocess.run([args.mace_python, str(ROOT / "scripts" / "make_mace_fixtures.py"), "--out", str(root)],
                           check=True, stderr=subprocess.DEVNULL)
        print("| family | dtype | max dev. energy (eV) | forces (eV/Å) | stress (eV/Å³) | within tolerance |")
        print("|---|---|---|---|---|---|")
        ok = True
        for dump in sorted(p for p in root.iterdir() if (p / "reference.json").is_file()):
            d = deviations(dump)
            tol = TOL[d["dtype"]]
            good = all(d[q][0] <= tol * max(1.0, d[q][1]) for q in ("energy", "forces", "stress"))
            ok &= good
            print(f"| {dump.name} | {d['dtype']} | {d['energy'][0]:.1e} | {d['forces'][0]:.1e} | "
                  f"{d['stress'][0]:.1e} | {'yes' if good else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
