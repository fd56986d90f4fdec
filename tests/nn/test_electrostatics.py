"""Electrostatics: water in growing boxes (field-notes values), NaCl Madelung constant, forces and stress vs
finite differences, invariances, mixed batches, PME vs Ewald, errors."""
import importlib.util
import math

import numpy as np
import pytest
import torch
from ase.build import bulk

from foundation.data.graph import neighbor_list
from foundation.nn import electrostatics as el

F64 = torch.float64
K = el.COULOMB_CONSTANT
MADELUNG_NACL = 1.747564594633
needs_torchpme = pytest.mark.skipif(importlib.util.find_spec("torchpme") is None,
                                    reason="torch-pme is not installed (pip install torch-pme)")


pytestmark = pytest.mark.usefixtures("one_thread")
# O at the origin, H at 0.96 Å along x, H at (-0.24, 0.93) (O-H 0.9605 Å, H-O-H 104.47°): reproduces the
# field notes' -5.04185 eV (molecule) and -5.04880 / -5.04269 / -5.04210 eV (cubic boxes 10 / 20 / 30 Å).
WATER = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=F64)
WATER_Q = torch.tensor([-0.8, 0.4, 0.4], dtype=F64)


def _one(n):
    return torch.zeros(n, dtype=torch.long)


def _random_cell(seed, n, charged=False):
    g = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[6.0, 0.3, 0.0], [0.8, 5.5, -0.4], [0.2, 0.6, 6.5]], dtype=F64)
    pos = torch.rand(n, 3, generator=g, dtype=F64) @ cell
    q = torch.randn(n, generator=g, dtype=F64)
    q = q if charged else q - q.mean()
    return pos, cell, q


def test_constant_matches_ase_units():
    assert K == pytest.approx(14.399645, abs=1e-6)


def test_water_molecule_and_growing_boxes_match_field_notes():
    e_mol = el.coulomb_energy(WATER_Q, WATER, _one(3), 1, sigma=1.0)
    assert e_mol.item() == pytest.approx(-5.04185, abs=1e-5)
    boxes = {10.0: -5.04880, 20.0: -5.04269, 30.0: -5.04210}
    previous = None
    for length, expected in boxes.items():
        cell = torch.eye(3, dtype=F64).unsqueeze(0) * length
        e_box = el.ewald_energy(WATER_Q, WATER + length / 2, cell, _one(3), 1, sigma=1.0, kcut=5.0)
        assert e_box.item() == pytest.approx(expected, abs=1e-5)
        gap = abs(e_box.item() - e_mol.item())
        assert previous is None or gap < previous  # converges to the molecule (dipole term ~ 1/L^3)
        previous = gap
    assert previous < 3e-4


def test_kcut_pi_truncation_is_visible_and_convergence_with_kcut():
    cell = torch.eye(3, dtype=F64).unsqueeze(0) * 10.0
    energies = [el.ewald_energy(WATER_Q, WATER, cell, _one(3), 1, 1.0, kc).item() for kc in (math.pi, 5.0, 7.0)]
    assert abs(energies[0] - energies[2]) > 5e-3  # kcut = pi is ~1e-2 eV short for sigma = 1 Å
    assert abs(energies[1] - energies[2]) < 1e-5


def test_kvectors_complete_half_sphere_for_skewed_cell():
    cell = torch.tensor([[4.0, 0.0, 0.0], [3.7, 1.5, 0.0], [-2.0, 1.0, 6.0]], dtype=F64)
    k = el.kvectors(cell, 4.0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-12, 13, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    brute = grid @ (2 * math.pi * torch.linalg.inv(cell).T)
    norms = brute.norm(dim=1)
    inside = (norms > 0) & (norms <= 4.0)
    assert 2 * k.shape[0] == int(inside.sum())  # +-k pairs: half of the sphere
    assert k.norm(dim=1).max() <= 4.0 and k.norm(dim=1).min() > 0
    both = torch.cat([k, -k])
    assert torch.allclose(torch.sort(both.norm(dim=1)).values, torch.sort(norms[inside]).values)


def _point_charge_energy(atoms, sigma=0.8, kcut=10.0, r_cut=6.4):
    """Point-charge Ewald: latent (smeared) k-space sum + real-space erfc term."""
    pos = torch.tensor(atoms.positions, dtype=F64)
    cell = torch.tensor(np.asarray(atoms.cell), dtype=F64)
    q = torch.tensor([1.0 if z == 11 else -1.0 for z in atoms.numbers], dtype=F64)
    edge_index, unit = neighbor_list(atoms.positions, np.asarray(atoms.cell), atoms.pbc, r_cut)
    send, recv = torch.as_tensor(edge_index[0]), torch.as_tensor(edge_index[1])
    vectors = pos[recv] - pos[send] + torch.as_tensor(unit) @ cell
    n = len(atoms)
    kspace = el.ewald_energy(q, pos, cell.unsqueeze(0), _one(n), 1, sigma, kcut)
    real = el.ewald_real_space_energy(q, vectors, send, recv, _one(n), 1, sigma)
    return (kspace + real).item()


@pytest.mark.parametrize("cubic", [True, False])
def test_nacl_madelung_constant(cubic):
    a = 5.64
    atoms = bulk("NaCl", "rocksalt", a=a, cubic=cubic)
    pairs = len(atoms) // 2
    madelung = -_point_charge_energy(atoms) * (a / 2) / (K * pairs)
    assert madelung == pytest.approx(MADELUNG_NACL, rel=1e-5)
    # the split is exact: another sigma gives the same point-charge energy
    other = -_point_charge_energy(atoms, sigma=0.6, kcut=13.0, r_cut=5.0) * (a / 2) / (K * pairs)
    assert other == pytest.approx(MADELUNG_NACL, rel=1e-5)


def _energy_fn(kind, q, cell, n):
    if kind == "molecule":
        return lambda p, c: el.coulomb_energy(q, p, _one(n), 1, 1.0).sum()
    if kind == "ewald":
        return lambda p, c: el.ewald_energy(q, p, c.unsqueeze(0), _one(n), 1, 1.0, 5.0).sum()
    return lambda p, c: el.pme_energy(q, p, c, 1.0, 5.0, 0.31, 7)


@pytest.mark.parametrize("kind,charged", [("molecule", True), ("ewald", False), ("ewald", True)])
def test_forces_match_central_differences(kind, charged):
    pos, cell, q = _random_cell(1, 6, charged)
    energy = _energy_fn(kind, q, cell, 6)
    p = pos.clone().requires_grad_(True)
    forces = -torch.autograd.grad(energy(p, cell), p)[0]
    h = 1e-4
    numeric = torch.zeros_like(pos)
    for i in range(6):
        for d in range(3):
            plus, minus = pos.clone(), pos.clone()
            plus[i, d] += h
            minus[i, d] -= h
            numeric[i, d] = -(energy(plus, cell) - energy(minus, cell)) / (2 * h)
    assert torch.allclose(forces, numeric, rtol=1e-6, atol=1e-6 * forces.abs().max().item())


def _stress(energy, pos, cell):
    """Autograd stress (3,3) eV/Å³ = (1/V) dE/dD through the strain, and its finite-strain counterpart."""
    disp = torch.zeros(1, 3, 3, dtype=F64, requires_grad=True)
    sym = 0.5 * (disp + disp.transpose(1, 2))
    e = energy(pos + pos @ sym[0], el.strained_cell(cell.unsqueeze(0), disp)[0])
    volume = torch.linalg.det(cell).abs()
    stress = torch.autograd.grad(e, disp)[0][0] / volume
    h = 1e-5
    numeric = torch.zeros(3, 3, dtype=F64)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=F64)
            eps[a, b] = eps[b, a] = h
            strain = [torch.eye(3, dtype=F64) + s * eps for s in (1, -1)]
            e_pm = [energy(pos @ m, cell @ m) for m in strain]
            numeric[a, b] = (e_pm[0] - e_pm[1]) / (2 * h) / volume / (1 if a == b else 2)
    return stress, numeric


@pytest.mark.parametrize("charged", [False, True])
def test_ewald_stress_matches_finite_strain(charged):
    pos, cell, q = _random_cell(2, 6, charged)
    stress, numeric = _stress(_energy_fn("ewald", q, cell, 6), pos, cell)
    assert torch.allclose(stress, numeric, rtol=1e-6, atol=1e-6 * stress.abs().max().item())
    assert torch.allclose(stress, stress.T, atol=1e-12)


def _strain_gradient(energy, pos, cell):
    """(1/V) dE/dD (3,3) by autograd through the strain (no finite differences)."""
    disp = torch.zeros(1, 3, 3, dtype=F64, requires_grad=True)
    sym = 0.5 * (disp + disp.transpose(1, 2))
    e = energy(pos + pos @ sym[0], el.strained_cell(cell.unsqueeze(0), disp)[0])
    return torch.autograd.grad(e, disp)[0][0] / torch.linalg.det(cell).abs()


def test_molecule_in_large_box_stress_is_its_virial_and_forces_match():
    """A molecule in a big box: stress -> (molecular virial) / V and forces -> molecular forces."""
    cell = torch.eye(3, dtype=F64) * 20.0
    pos = WATER + 10.0
    energy_box = _energy_fn("ewald", WATER_Q, cell, 3)
    energy_mol = _energy_fn("molecule", WATER_Q, cell, 3)
    s_box, s_mol = _strain_gradient(energy_box, pos, cell), _strain_gradient(energy_mol, pos, cell)
    assert s_mol.abs().max().item() > 1e-5  # the molecule is not at equilibrium: a real virial
    assert (s_box - s_mol).abs().max().item() < 1e-2 * s_mol.abs().max().item()
    p = pos.clone().requires_grad_(True)
    f_box = -torch.autograd.grad(energy_box(p, cell), p)[0]
    p2 = pos.clone().requires_grad_(True)
    f_mol = -torch.autograd.grad(energy_mol(p2, cell), p2)[0]
    assert torch.allclose(f_box, f_mol, atol=5e-3 * f_mol.abs().max().item())  # image-dipole field ~1e-3 eV/Å
    # per-atom shares converge too (the k-space split q_i phi_i / 2 -> half of each erf pair)
    a_box = el.ewald_atom_energies(WATER_Q, pos, cell.unsqueeze(0), _one(3), 1, 1.0, 5.0)
    a_mol = el.coulomb_atom_energies(WATER_Q, pos, _one(3), 1, 1.0)
    assert torch.allclose(a_box, a_mol, atol=2e-3)
    assert a_box.sum().item() == pytest.approx(energy_box(pos, cell).item(), rel=1e-12)


def test_translation_and_wrapping_invariance():
    pos, cell, q = _random_cell(3, 7, charged=True)
    ewald = _energy_fn("ewald", q, cell, 7)
    mol = _energy_fn("molecule", q, cell, 7)
    shift = torch.tensor([0.37, -1.2, 2.9], dtype=F64)
    assert ewald(pos + shift, cell).item() == pytest.approx(ewald(pos, cell).item(), rel=1e-12)
    assert mol(pos + shift, cell).item() == pytest.approx(mol(pos, cell).item(), rel=1e-12)
    wrapped = pos.clone()
    wrapped[2] += cell[0] - 2 * cell[2]  # an atom moved by a lattice vector
    assert ewald(wrapped, cell).item() == pytest.approx(ewald(pos, cell).item(), rel=1e-10)


def test_mixed_batch_equals_single_structures():
    p1, c1, q1 = _random_cell(4, 5, charged=True)
    p2, c2, q2 = _random_cell(5, 9)
    c2 = c2 * 1.3
    pos = torch.cat([WATER, p1, p2, WATER + 1.0])
    q = torch.cat([WATER_Q, q1, q2, -WATER_Q])
    batch = torch.cat([torch.full((n,), s) for s, n in enumerate((3, 5, 9, 3))])
    cell = torch.stack([torch.zeros(3, 3, dtype=F64), c1, c2, torch.zeros(3, 3, dtype=F64)])
    pbc = torch.tensor([[False] * 3, [True] * 3, [True, True, False], [False] * 3])
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))  # atoms need not be contiguous
    energy = el.electrostatic_energy(q[perm], pos[perm], cell, pbc, batch[perm], 4, sigma=1.0)
    single = [el.coulomb_energy(WATER_Q, WATER, _one(3), 1, 1.0),
              el.ewald_energy(q1, p1, c1.unsqueeze(0), _one(5), 1, 1.0, 6.0),
              el.ewald_energy(q2, p2, c2.unsqueeze(0), _one(9), 1, 1.0, 6.0),
              el.coulomb_energy(-WATER_Q, WATER + 1.0, _one(3), 1, 1.0)]
    assert torch.allclose(energy, torch.cat(single), rtol=1e-12, atol=1e-12)
    assert energy.shape == (4,)
    atoms = el.electrostatic_atom_energies(q[perm], pos[perm], cell, pbc, batch[perm], 4, sigma=1.0)
    assert atoms.shape == (20,)
    assert torch.allclose(el.structure_sum(atoms, batch[perm], 4), energy, rtol=1e-12)
    unperm = torch.empty_like(perm).index_put((perm,), torch.arange(20))
    assert torch.allclose(atoms[unperm][3:8], el.ewald_atom_energies(q1, p1, c1.unsqueeze(0), _one(5), 1, 1.0, 6.0))


@needs_torchpme
@pytest.mark.parametrize("charged", [False, True])
def test_pme_agrees_with_ewald_on_medium_cell(charged):
    g = torch.Generator().manual_seed(6)
    cell = torch.tensor([[9.6, 0.0, 0.0], [1.0, 9.4, 0.0], [0.5, -0.7, 9.5]], dtype=F64)  # 32^3 mesh
    pos = torch.rand(150, 3, generator=g, dtype=F64) @ cell
    q = 0.5 * torch.randn(150, generator=g, dtype=F64)
    q = q if charged else q - q.mean()
    results = {}
    for kind in ("ewald", "pme"):
        p = pos.clone().requires_grad_(True)
        energy = _energy_fn(kind, q, cell, 150)(p, cell)
        results[kind] = (energy.item(), -torch.autograd.grad(energy, p)[0])
    assert results["pme"][0] == pytest.approx(results["ewald"][0], rel=1e-6)
    force_scale = results["ewald"][1].abs().max()
    assert (results["pme"][1] - results["ewald"][1]).abs().max() < 1e-4 * force_scale


@needs_torchpme
def test_pme_stress_matches_ewald_and_dispatch_uses_threshold():
    pos, cell, q = _random_cell(7, 40, charged=True)
    s_ewald = _strain_gradient(_energy_fn("ewald", q, cell, 40), pos, cell)  # checked against FD above
    s_pme = _strain_gradient(_energy_fn("pme", q, cell, 40), pos, cell)
    assert torch.allclose(s_pme, s_ewald, atol=1e-5 * s_ewald.abs().max().item())
    pbc = torch.ones(1, 3, dtype=torch.bool)
    via_pme = el.electrostatic_energy(q, pos, cell.unsqueeze(0), pbc, _one(40), 1, pme_threshold=40, kcut=5.0,
                                      mesh_spacing=0.31)
    direct = el.pme_energy(q, pos, cell, 1.0, 5.0, 0.31, 7)
    assert via_pme.item() == pytest.approx(direct.item(), rel=1e-12)
    atoms_pme = el.pme_atom_energies(q, pos, cell, 1.0, 5.0, 0.31, 7)
    atoms_ewald = el.ewald_atom_energies(q, pos, cell.unsqueeze(0), _one(40), 1, 1.0, 5.0)
    assert (atoms_pme - atoms_ewald).abs().max() < 1e-5 * atoms_ewald.abs().max()
    via_ewald = el.electrostatic_energy(q, pos, cell.unsqueeze(0), pbc, _one(40), 1, pme_threshold=41, kcut=5.0)
    assert via_ewald.item() != via_pme.item()
    assert via_ewald.item() == pytest.approx(via_pme.item(), rel=1e-5)


def test_bf16_autocast_does_not_degrade_the_sums():
    pos, cell, q = _random_cell(9, 30)
    pos, cell, q = pos.float(), cell.float(), q.float()
    pbc = torch.tensor([[True] * 3, [False] * 3])
    batch = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    args = (torch.cat([q, WATER_Q.float()]), torch.cat([pos, WATER.float()]),
            torch.stack([cell, torch.zeros(3, 3)]), pbc, batch, 2)
    reference = el.electrostatic_energy(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = el.electrostatic_energy(*args)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, reference)


@needs_torchpme
def test_bf16_autocast_pme():
    pos, cell, q = (t.float() for t in _random_cell(9, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pme = el.pme_energy(q, pos, cell, 1.0, 5.0, 0.5)
    assert pme.item() == pytest.approx(el.pme_energy(q, pos, cell, 1.0, 5.0, 0.5).item(), rel=1e-6)


def test_float32_inputs_and_errors():
    pos, cell, q = _random_cell(8, 6)
    e64 = el.ewald_energy(q, pos, cell.unsqueeze(0), _one(6), 1, 1.0, 5.0)
    e32 = el.ewald_energy(q.float(), pos.float(), cell.float().unsqueeze(0), _one(6), 1, 1.0, 5.0)
    assert e32.dtype == torch.float32 and e32.item() == pytest.approx(e64.item(), rel=1e-4)
    flat = cell.clone()
    flat[2] = 0.0
    with pytest.raises(ValueError, match=r"structures \[0\] are periodic but their cells have zero volume"):
        el.ewald_energy(q, pos, flat.unsqueeze(0), _one(6), 1, 1.0, 5.0)
    with pytest.raises(ValueError, match="mesh_spacing .* too coarse"):
        el.pme_energy(q, pos, cell, 1.0, 5.0, 0.7)
    with pytest.raises(ValueError, match="only handles molecules"):
        el.electrostatic_energy(q, pos, cell.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool), _one(6), 1,
                                periodic_allowed=False)
