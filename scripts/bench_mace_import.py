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


def predict(model, ref: dict, head: str | None, dtype: str) -> dict:
    """Our outputs in reference.json's layout (structures copied from ``ref``): per structure (FoundationCalculator)
    energy eV, forces eV/Å, stress eV/Å³ (3x3, zeros if not periodic), and the mixed batch through the model."""
    out = {"structures": {}}
    calc = FoundationCalculator(model, head=head, dtype=dtype)
    for name, s in ref["structures"].items():
        atoms = _atoms(s)
        atoms.calc = calc
        stress = atoms.get_stress(voigt=False) if atoms.pbc.any() else np.zeros((3, 3))
        out["structures"][name] = {**s, "energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                                   "stress": stress}
    index = model.config.heads.index(head) if head else 0
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    graphs = [from_atoms(_atoms(ref["structures"][n]), model.config.r_max, with_labels=False, head=index,
                         dtype=torch_dtype) for n in ref["batch"]["order"]]
    result = model.to(torch_dtype)(collate(graphs), compute_stress=True)
    out["batch"] = {"order": ref["batch"]["order"], **{q: result[k].detach().numpy() for q, k in
                    (("energy", keys.ENERGY), ("forces", keys.FORCES), ("stress", keys.STRESS))}}
    return out


def max_deviations(ref: dict, got: dict) -> dict:
    """{quantity: (max |got - ref|, max |ref|)} over the structures and the batch (stress of periodic ones)."""
    dev = {"energy": [0.0, 0.0], "forces": [0.0, 0.0], "stress": [0.0, 0.0]}

    def add(q, ours, theirs):
        ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
        dev[q][0] = max(dev[q][0], float(np.abs(ours - theirs).max()))
        dev[q][1] = max(dev[q][1], float(np.abs(theirs).max()))
    for name, s in ref["structures"].items():
        for q in ("energy", "forces") + (("stress",) if any(s["pbc"]) else ()):
            add(q, got["structures"][name][q], s[q])
    periodic = [k for k, n in enumerate(ref["batch"]["order"]) if any(ref["structures"][n]["pbc"])]
    for q in ("energy", "forces"):
        add(q, got["batch"][q], ref["batch"][q])
    add("stress", np.asarray(got["batch"]["stress"])[periodic], np.asarray(ref["batch"]["stress"])[periodic])
    return {q: tuple(v) for q, v in dev.items()}


def within(dev: dict, dtype: str) -> bool:
    """The issue's test: max deviation <= tol x max(1, max |reference|) for energy, forces and stress."""
    return all(dev[q][0] <= TOL[dtype] * max(1.0, dev[q][1]) for q in ("energy", "forces", "stress"))


def row(name: str, dtype: str, dev: dict) -> str:
    """One markdown table row: name | dtype | max dev. E | F | S | within tolerance."""
    return (f"| {name} | {dtype} | {dev['energy'][0]:.1e} | {dev['forces'][0]:.1e} | {dev['stress'][0]:.1e} | "
            f"{'yes' if within(dev, dtype) else 'NO'} |")


def deviations(dump: Path) -> dict:
    """{"dtype", quantity: (max deviation, max |mace|)} of one family over its structures and the batch."""
    model = build_model(*read_dump(dump))
    ref = json.loads((dump / "reference.json").read_text())
    return {"dtype": ref["dtype"], **max_deviations(ref, predict(model, ref, ref["head"], ref["dtype"]))}


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
            ok &= within(d, d["dtype"])
            print(row(dump.name, d["dtype"], d))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
