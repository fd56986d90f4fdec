"""The mace-family components (Agnesi transform, ZBL repulsion, density normalisation, non-residual first block,
mace energy form) pass the physics conformance checks, and ZBL/Agnesi follow their closed forms."""
from __future__ import annotations

import math

import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.data import covalent_radii

from foundation.model.backbone import FoundationModel
from foundation.model.config import ModelConfig
from foundation.nn.pair import AgnesiTransform, ZBLRepulsion, check_pair_repulsion
from foundation.testing import check_all

ELEMENTS = ["H", "C", "O", "Cu"]
RADII = [float(covalent_radii[z]) for z in (1, 6, 8, 29)]
ZBL = {"kind": "zbl", "p": 5.0, "a_exp": 0.3, "a_prefactor": 0.4543, "c": [0.1818, 0.5099, 0.2802, 0.02817],
       "covalent_radii": RADII}
AGNESI = {"kind": "agnesi", "q": 0.9183, "p": 4.5791, "a": 1.0805, "covalent_radii": RADII}


def test_zbl_closed_form():
    zbl = ZBLRepulsion(ZBL)
    r = torch.tensor([0.8, 1.5, 3.0], dtype=torch.float64)
    z_idx = torch.tensor([3, 3, 3])
    number = torch.full((3,), 29.0, dtype=torch.float64)
    v = zbl(r, torch.tensor([0, 0, 0]), 1, z_idx, z_idx, number, number)
    a = 0.4543 * 0.529 / (2 * 29 ** 0.3)
    expect = 0.0
    for x in r.tolist():
        phi = sum(c * math.exp(-d * x / a) for c, d in zip(ZBL["c"], (3.2, 0.9423, 0.4028, 0.2016)))
        y = x / (2 * RADII[3])
        env = (1 - 21 * y ** 5 + 35 * y ** 6 - 15 * y ** 7) if y < 1 else 0.0
        expect += 0.5 * 14.3996 * 29 * 29 / x * phi * env
    assert abs(float(v[0]) - expect) < 1e-12 * expect


def test_agnesi_closed_form():
    t = AgnesiTransform(AGNESI)
    r = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = r / (0.5 * (RADII[0] + RADII[3]))
    expect = 1 / (1 + 1.0805 * y ** 0.9183 / (1 + y ** (0.9183 - 4.5791)))
    assert torch.allclose(t(r, torch.tensor([0, 0]), torch.tensor([3, 3])), expect, rtol=1e-14)


def test_bad_pair_spec_is_named():
    with pytest.raises(ValueError, match="covalent_radii"):
        check_pair_repulsion({**ZBL, "covalent_radii": [1.0]}, 4)


@pytest.mark.parametrize("first,norm", [("plain", "density"), ("residual", "average")])
def test_mace_components_conformance(first, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(elements=ELEMENTS, r_max=4.0, num_channels=4, max_L=1, num_bessel=6, radial_mlp=[8, 8],
                      readout_mlp=4, energy_form="mace", first_interaction=first, interaction_norm=norm,
                      distance_transform=AGNESI, pair_repulsion=ZBL, scale=1.3, shift=-0.2,
                      atomic_energies=[-1.0, -2.0, -3.0, -4.0])
    model = FoundationModel(cfg)
    mol = molecule("CH3OH")
    mol.positions *= 0.9  # C-H inside the ZBL range (R_C + R_H)
    crystal = bulk("Cu", "fcc", a=3.2, cubic=True)
    crystal.rattle(0.05, seed=1)
    report = check_all(model, mol, crystal)
    assert "isolated" not in report and report["crystal_stress_fd"] < 1e-6
    iso = model(_batch(Atoms("Cu", positions=[[0, 0, 0]]), cfg.r_max))["energy"]
    assert abs(float(iso) - (-4.0 + 1.3 * _iso_readout(model) - 0.2)) < 1e-10


def _batch(atoms, r_max):
    from foundation.data.graph import from_atoms
    from foundation.data.loader import collate
    return collate([from_atoms(atoms, r_max, with_labels=False)])


def _iso_readout(model) -> float:
    from foundation.nn.linear import ElementGroups
    groups = ElementGroups(((3, 0, 1),))
    return float(model._isolated_readouts(groups)[3, 0])
