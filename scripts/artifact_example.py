"""Energy, forces and stress of a structure with a `foundation export torchscript` artifact: torch, ASE and vesin
only (no `foundation` import). Usage: python scripts/artifact_example.py model.pt STRUCTURE (any file ASE reads).

Prints for each frame one JSON line {"energy": eV, "forces": [[eV/Å]], "stress": [[eV/Å³]] or null}. The test suite
runs this file in a process that cannot import foundation and compares it with FoundationCalculator
(1e-10 eV in float64).
"""
import json
import sys

import ase.io
import numpy as np
import torch
from vesin import NeighborList


def predict(model: torch.jit.ScriptModule, atoms) -> dict:
    """One artifact call on an ASE Atoms: the neighbour list (all pairs < r_max, both directions) comes from vesin."""
    pbc = atoms.pbc.copy()
    cell = atoms.cell.array if pbc.any() else np.zeros((3, 3))
    i, j, unit_shifts = NeighborList(cutoff=model.r_max, full_list=True).compute(
        points=atoms.positions, box=cell, periodic=pbc, quantities="ijS")
    inputs = {
        "pos": torch.tensor(atoms.positions),                                    # (n, 3) Å
        "atomic_numbers": torch.tensor(atoms.numbers),                           # (n,)
        "cell": torch.tensor(cell).unsqueeze(0),                                  # (1, 3, 3) Å
        "pbc": torch.tensor(pbc).unsqueeze(0),                                    # (1, 3)
        "edge_index": torch.tensor(np.stack([i, j]), dtype=torch.long),          # [sender; receiver]
        "shifts": torch.tensor(unit_shifts, dtype=torch.float64) @ torch.tensor(cell),  # (E, 3) Å
        "total_charge": torch.tensor([float(atoms.info.get("charge", 0.0))]),     # (1,) e
    }
    out = model(inputs)
    stress = out["stress"][0].tolist() if pbc.any() and "stress" in out else None
    return {"energy": float(out["energy"][0]), "forces": out["forces"].tolist(), "stress": stress}


if __name__ == "__main__":
    artifact = torch.jit.load(sys.argv[1])
    for atoms in ase.io.read(sys.argv[2], index=":"):
        print(json.dumps(predict(artifact, atoms)))
