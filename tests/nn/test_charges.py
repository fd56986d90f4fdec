"""LongRangeHead: config validation, exact total-charge constraint, dipole, forces/stress through the model's
strain path vs finite differences, batch == single, and learning charges from energies and forces alone."""
import math

import pytest
import torch
from ase.build import bulk

from foundation import keys
from foundation.model import derivatives
from foundation.nn import electrostatics as el
from foundation.nn.charges import DEFAULTS, LongRangeHead, constrain_total_charge, long_range_config

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_defaults_and_validation():
    cfg = long_range_config(None)
    assert cfg["kind"] == "latent_ewald" and cfg["sigma"] == 1.0 and cfg["kcut"] == 6.0
    assert cfg["mesh_spacing"] == pytest.approx(0.9 * math.pi / 6.0) and set(cfg) == set(DEFAULTS)
    assert long_range_config({"sigma": 2.0})["kcut"] == 3.0
    assert long_range_config({"kcut": 8.0})["mesh_spacing"] == pytest.approx(0.9 * math.pi / 8.0)
    with pytest.raises(ValueError, match=r"unknown keys 'sigmaa' \(did you mean 'sigma'\?\)"):
        long_range_config({"sigmaa": 1.0})
    bad = [({"kind": "ewald"}, "kind must be one of"), ({"sigma": 0}, "sigma must be a positive length"),
           ({"sigma": float("nan")}, "sigma"), ({"kcut": -1.0}, "kcut must be a positive"),
           ({"pme_threshold": 0}, "pme_threshold"), ({"pme_threshold": True}, "pme_threshold"),
           ({"mesh_spacing": 0.7}, r"mesh_spacing must be a positive length below pi / kcut = 0.5236"),
           ({"interpolation_nodes": 8}, "interpolation_nodes"), ({"hidden": 0}, "hidden must be a positive")]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            long_range_config(config)
    with pytest.raises(ValueError, match="num_features"):
        LongRangeHead(0)


def test_total_charge_constraint_is_exact_in_a_batch():
    g = torch.Generator().manual_seed(0)
    batch = torch.tensor([0] * 3 + [1] * 7 + [2] * 1 + [3] * 5)
    batch = batch[torch.randperm(16, generator=g)]
    total = torch.tensor([0.0, -1.0, 2.0, 0.5], dtype=F64)
    for dtype, tol in ((F64, 1e-13), (torch.float32, 2e-6)):
        raw = 3.0 * torch.randn(16, generator=g, dtype=F64).to(dtype)
        q, excess = constrain_total_charge(raw, batch, 4, total.to(dtype))
        sums = torch.zeros(4, dtype=dtype).index_add(0, batch, q)
        assert torch.allclose(sums, total.to(dtype), atol=tol, rtol=0)
        raw_sums = torch.zeros(4, dtype=dtype).index_add(0, batch, raw)
        assert torch.allclose(excess, raw_sums - total.to(dtype), atol=tol, rtol=0)
        # a uniform shift per structure: differences between charges are untouched
        assert torch.allclose(q[batch == 1] - q[batch == 1][0], raw[batch == 1] - raw[batch == 1][0], atol=tol)
    head = LongRangeHead(4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, _ = head.charges(torch.randn(16, 4, generator=g), batch, 4, total.float())
    assert q.dtype == torch.float32
    assert torch.allclose(torch.zeros(4).index_add(0, batch, q), total.float(), atol=2e-6, rtol=0)
    neutral, _ = constrain_total_charge(torch.randn(16, generator=g, dtype=F64), batch, 4, None)
    assert torch.zeros(4, dtype=F64).index_add(0, batch, neutral).abs().max() < 1e-13
    with pytest.raises(ValueError, match="total_charge contains NaN"):
        constrain_total_charge(raw, batch, 4, torch.tensor([0.0, float("nan"), 0.0, 0.0]))


def _features(pos, z, batch):
    """Smooth invariant-like node features (n, 3): element one-hot + a Gaussian coordination number."""
    same = batch[:, None] == batch[None, :]
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    coordination = (torch.exp(-d2 / 4.0) * same).sum(1) - 1.0
    return torch.cat([torch.nn.functional.one_hot(z, 2).to(pos.dtype), coordination[:, None]], dim=1)


def _mixed_batch(seed=0):
    """A charged molecule (5 atoms), a neutral triclinic cell (6 atoms) and a charged cubic cell (4 atoms)."""
    g = torch.Generator().manual_seed(seed)
    cells = [torch.zeros(3, 3, dtype=F64),
             torch.tensor([[5.5, 0.3, 0.0], [0.8, 5.0, -0.4], [0.2, 0.6, 6.0]], dtype=F64),
             torch.eye(3, dtype=F64) * 4.5]
    sizes = (5, 6, 4)
    pos = torch.cat([torch.rand(n, 3, generator=g, dtype=F64) @ (c if c.abs().sum() else torch.eye(3, dtype=F64) * 3.0)
                     for n, c in zip(sizes, cells)])
    z = torch.randint(0, 2, (15,), generator=g)
    batch = torch.cat([torch.full((n,), s) for s, n in enumerate(sizes)])
    pbc = torch.tensor([[False] * 3, [True] * 3, [True] * 3])
    return pos, z, batch, torch.stack(cells), pbc, torch.tensor([-1.0, 0.0, 1.0], dtype=F64)


def _head(seed=0, **config):
    torch.manual_seed(seed)
    return LongRangeHead(3, config, dtype=F64)


def test_forward_outputs_charges_and_dipole():
    pos, z, batch, cell, pbc, total = _mixed_batch()
    head = _head()
    out = head(_features(pos, z, batch), pos, batch, 3, cell, pbc, total)
    assert out[keys.ENERGY].shape == (3,) and out[keys.CHARGES].shape == (15,) and out[keys.DIPOLE].shape == (3, 3)
    q = out[keys.CHARGES]
    assert torch.allclose(torch.zeros(3, dtype=F64).index_add(0, batch, q), total, atol=1e-13)
    for s in range(3):
        assert torch.allclose(out[keys.DIPOLE][s], (q[batch == s, None] * pos[batch == s]).sum(0))
    # the energy is the electrostatics of these charges; the neutral structure's dipole is origin-independent
    expected = el.electrostatic_energy(q, pos, cell, pbc, batch, 3, sigma=1.0)
    assert torch.allclose(out[keys.ENERGY], expected, rtol=1e-12)
    assert out[keys.NODE_ENERGY].shape == (15,)
    assert torch.allclose(el.structure_sum(out[keys.NODE_ENERGY], batch, 3), out[keys.ENERGY], rtol=1e-12)
    moved = head(_features(pos + 2.0, z, batch), pos + 2.0, batch, 3, cell, pbc, total)
    assert torch.allclose(moved[keys.DIPOLE][1], out[keys.DIPOLE][1], atol=1e-12)
    assert torch.allclose(moved[keys.ENERGY], out[keys.ENERGY], rtol=1e-10)


def _model_energy(head, pos, z, batch, cell, pbc, total):
    """The integration path: strain as FoundationModel does (apply_strain), strained cell, head energy."""
    sender = torch.zeros(0, dtype=torch.long)
    disp, pos_s, _ = derivatives.apply_strain(pos, torch.zeros(0, 3, dtype=F64), batch, sender, 3)
    cell_s = el.strained_cell(cell, disp)
    out = head(_features(pos_s, z, batch), pos_s, batch, 3, cell_s, pbc, total)
    return out[keys.ENERGY], disp


def test_forces_and_stress_through_the_strain_match_finite_differences():
    pos, z, batch, cell, pbc, total = _mixed_batch(1)
    head = _head(1)
    p = pos.clone().requires_grad_(True)
    energy, disp = _model_energy(head, p, z, batch, cell, pbc, total)
    forces, stress, _ = derivatives.forces_and_stress(energy, p, disp, cell, pbc, create_graph=False)

    def total_energy(x, c):
        with torch.no_grad():
            return head(_features(x, z, batch), x, batch, 3, c, pbc, total)[keys.ENERGY]

    h = 1e-4
    for i in (0, 6, 12):  # one atom in each structure
        for d in range(3):
            step = torch.zeros_like(pos)
            step[i, d] = h
            numeric = -(total_energy(pos + step, cell) - total_energy(pos - step, cell)).sum() / (2 * h)
            assert forces[i, d].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-8)
    volume = torch.linalg.det(cell).abs()
    for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)):
        eps = torch.zeros(3, 3, dtype=F64)
        eps[a, b] = eps[b, a] = h
        e_pm = []
        for sign in (1, -1):
            m = (torch.eye(3, dtype=F64) + sign * eps)
            e_pm.append(total_energy(pos @ m, cell @ m))
        numeric = (e_pm[0] - e_pm[1]) / (2 * h) / (1 if a == b else 2)
        for s in (1, 2):  # the periodic structures
            assert stress[s, a, b].item() == pytest.approx(numeric[s].item() / volume[s].item(), rel=1e-6, abs=1e-10)
    assert stress[0].abs().max() == 0  # molecules: no stress


def test_batch_equals_single_structures_and_coulomb_kind():
    pos, z, batch, cell, pbc, total = _mixed_batch(2)
    head = _head(2)
    feats = _features(pos, z, batch)
    out = head(feats, pos, batch, 3, cell, pbc, total)
    for s in range(3):
        m = batch == s
        one = head(feats[m], pos[m], torch.zeros(int(m.sum()), dtype=torch.long), 1, cell[s:s + 1], pbc[s:s + 1],
                   total[s:s + 1])
        assert torch.allclose(one[keys.ENERGY][0], out[keys.ENERGY][s], rtol=1e-12)
        assert torch.allclose(one[keys.CHARGES], out[keys.CHARGES][m], rtol=1e-12)
    molecules_only = _head(2, kind="coulomb")
    m = batch == 0
    e = molecules_only(feats[m], pos[m], torch.zeros(5, dtype=torch.long), 1, cell[:1], pbc[:1], total[:1])
    assert torch.allclose(e[keys.ENERGY][0], out[keys.ENERGY][0], rtol=1e-12)
    with pytest.raises(ValueError, match=r"structures \[1, 2\] are periodic"):
        molecules_only(feats, pos, batch, 3, cell, pbc, total)


def _reference_data(q_true=0.7):
    """NaCl clusters (molecules) and rattled rock-salt cells, labelled with fixed charges +-q_true."""
    g = torch.Generator().manual_seed(3)
    structures = []
    for _ in range(6):
        z = torch.tensor([0, 0, 1, 1])
        pos = 3.0 * torch.rand(4, 3, generator=g, dtype=F64) + torch.arange(4, dtype=F64)[:, None] * 0.8
        structures.append((pos, z, torch.zeros(3, 3, dtype=F64), torch.tensor([[False] * 3])))
    for _ in range(2):
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        pos = torch.tensor(atoms.positions, dtype=F64) + 0.15 * torch.randn(8, 3, generator=g, dtype=F64)
        z = torch.tensor([0 if n == 11 else 1 for n in atoms.numbers])
        structures.append((pos, z, torch.tensor(atoms.cell.array, dtype=F64), torch.tensor([[True] * 3])))
    pos = torch.cat([s[0] for s in structures])
    z = torch.cat([s[1] for s in structures])
    batch = torch.cat([torch.full((len(s[0]),), i) for i, s in enumerate(structures)])
    cell, pbc = torch.stack([s[2] for s in structures]), torch.cat([s[3] for s in structures])
    q = torch.where(z == 0, q_true, -q_true).to(F64)
    p = pos.clone().requires_grad_(True)
    energy = el.electrostatic_energy(q, p, cell, pbc, batch, len(structures))
    forces = -torch.autograd.grad(energy.sum(), p)[0]
    return pos, z, batch, cell, pbc, energy.detach(), forces


def test_learns_charges_from_energies_and_forces_alone():
    pos, z, batch, cell, pbc, energy_ref, forces_ref = _reference_data()
    num_graphs = int(batch.max()) + 1
    torch.manual_seed(0)
    head = LongRangeHead(2, {"hidden": 8}, dtype=F64)
    feats = torch.nn.functional.one_hot(z, 2).to(F64)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.03)
    first = None
    for _ in range(120):
        p = pos.clone().requires_grad_(True)
        out = head(feats, p, batch, num_graphs, cell, pbc)
        forces = -torch.autograd.grad(out[keys.ENERGY].sum(), p, create_graph=True)[0]
        loss = ((out[keys.ENERGY] - energy_ref) ** 2).mean() + ((forces - forces_ref) ** 2).mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    q = head(feats, pos, batch, num_graphs, cell, pbc)[keys.CHARGES].detach()
    # energies are quadratic in the charges: the sign is free, the magnitude is learned
    assert torch.allclose(q.abs(), torch.full_like(q, 0.7), atol=3e-3)
    assert torch.all(torch.sign(q[z == 0]) == -torch.sign(q[z == 1]).unique())
    assert first > 10.0 and loss.item() < 3e-3
