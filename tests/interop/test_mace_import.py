"""Exactness of ``foundation import mace`` against mace-torch's own outputs, without mace-torch.

The fixtures (scripts/make_mace_fixtures.py, run in a mace-torch 0.3.16 venv) hold, per family, a dump of a
random-weight mace model with the family's published components and mace's ``MACECalculator`` energies, forces
and stresses on a triclinic 4-element cell, a Cu-Au cell and a molecule, plus the three as one batch. Tolerance:
max |ours - mace| <= tol * max(1, max |mace|) per quantity, tol 1e-8 in float64 and 1e-5 in float32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from foundation import keys
from foundation.calculator import FoundationCalculator
from foundation.data.graph import from_atoms
from foundation.data.loader import collate
from foundation.interop.mace import import_mace
from foundation.model.backbone import FoundationModel

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["mp0", "mp0_float32", "off23", "mp0b3", "mpa0", "trained"]
TOL = {"float64": 1e-8, "float32": 1e-5}


def _check(ours, ref, tol: float, what: str) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    dev = float(np.abs(ours - ref).max()) if ref.size else 0.0
    assert dev <= tol * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0), f"{what}: deviation {dev:.3e}"
    return dev


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(family) / "model"
    import_mace(FIXTURES / family, out, license="mit")
    ref = json.loads((FIXTURES / family / "reference.json").read_text())
    return FoundationModel.from_pretrained(out), ref


def _atoms(s: dict) -> Atoms:
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


def test_calculator_matches_mace(imported):
    model, ref = imported
    tol = TOL[ref["dtype"]]
    calc = FoundationCalculator(model, head=ref["head"], dtype=ref["dtype"])
    for name, s in ref["structures"].items():
        atoms = _atoms(s)
        atoms.calc = calc
        _check(atoms.get_potential_energy(), s["energy"], tol, f"{ref['family']} {name} energy")
        _check(atoms.get_forces(), s["forces"], tol, f"{ref['family']} {name} forces")
        stress = atoms.get_stress(voigt=False) if atoms.pbc.any() else np.zeros((3, 3))
        _check(stress, s["stress"], tol, f"{ref['family']} {name} stress")


def test_mixed_batch_matches_mace(imported):
    model, ref = imported
    tol = TOL[ref["dtype"]]
    head = model.config.heads.index(ref["head"]) if ref["head"] else 0
    dtype = {"float64": torch.float64, "float32": torch.float32}[ref["dtype"]]
    graphs = [from_atoms(_atoms(ref["structures"][n]), model.config.r_max, with_labels=False, head=head,
                         dtype=dtype) for n in ref["batch"]["order"]]
    out = model.to(dtype)(collate(graphs), compute_forces=True, compute_stress=True)
    _check(out[keys.ENERGY].numpy(), ref["batch"]["energy"], tol, f"{ref['family']} batch energy")
    _check(out[keys.FORCES].numpy(), ref["batch"]["forces"], tol, f"{ref['family']} batch forces")
    # stress of the periodic members only: mace divides a molecule's virial by the volume of the placeholder
    # cell its data pipeline gives it (a 1e-8 artefact), foundation reports zero stress for it
    periodic = [k for k, n in enumerate(ref["batch"]["order"]) if any(ref["structures"][n]["pbc"])]
    _check(out[keys.STRESS].numpy()[periodic], np.asarray(ref["batch"]["stress"])[periodic], tol,
           f"{ref['family']} batch stress")


def test_imported_card_records_source(imported, tmp_path):
    model, ref = imported
    meta = model.hub_metadata
    assert meta["license"] == "mit"
    assert meta["provenance"]["mace_version"] == "0.3.16"
    assert len(meta["provenance"]["sha256"]) == 64
    assert "MACE" in meta["citation"]
