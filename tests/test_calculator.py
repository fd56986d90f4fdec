"""FoundationCalculator: ASE numerical checks, skin neighbor list == rebuild, pbc cases, heads, dtypes, batching."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError

from foundation import keys
from foundation.calculator import FoundationCalculator, SkinNeighborList
from foundation.data.graph import neighbor_list
from foundation.hub import HubMixin


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU OpenMP barriers make 2 threads ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- a smooth, conservative fixture model with two heads and a charge output (the calculator is generic) ---
@dataclasses.dataclass
class PairConfig:
    elements: list
    r_max: float = 4.0
    heads: list = dataclasses.field(default_factory=lambda: ["pbe", "r2scan"])
    num_basis: int = 6
    charges: bool = True

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class PairModel(HubMixin, torch.nn.Module):
    """E = sum_i [e0_zi + sum_j phi_head(zi,zj,r_ij)] + a sum_i q_i^2, q from neighbor sums (total charge kept)."""

    config_class = PairConfig

    def __init__(self, config: PairConfig):
        super().__init__()
        self.config = config
        n, k, h = len(config.elements), config.num_basis, len(config.heads)
        self.w = torch.nn.Parameter(0.05 * torch.randn(h, n, n, k))
        self.wq = torch.nn.Parameter(0.3 * torch.randn(n, k))
        self.register_buffer("e0", -torch.rand(n))
        self.register_buffer("mu", torch.linspace(1.0, config.r_max, k))
        from ase.data import atomic_numbers
        index = torch.full((119,), -1, dtype=torch.long)
        index[[atomic_numbers[e] for e in config.elements]] = torch.arange(n)
        self.register_buffer("z_index", index, persistent=False)

    def forward(self, batch, compute_forces=True, compute_stress=False):
        pos, cell, b = batch[keys.POSITIONS], batch[keys.CELL].view(-1, 3, 3), batch.batch
        send, recv = batch[keys.EDGE_INDEX]
        disp = torch.zeros_like(cell, requires_grad=True)
        strain = 0.5 * (disp + disp.transpose(1, 2))
        pos = pos.requires_grad_(True)
        p = pos + torch.einsum("ni,nij->nj", pos, strain[b])
        shifts = batch[keys.SHIFTS] + torch.einsum("ei,eij->ej", batch[keys.SHIFTS], strain[b[send]])
        vec = p[recv] - p[send] + shifts
        r = vec.norm(dim=1)
        x = r / self.config.r_max
        fcut = torch.where(x < 1, (1 - x ** 2) ** 3, torch.zeros_like(x))
        basis = torch.exp(-((r[:, None] - self.mu) ** 2) / 0.5) * fcut[:, None]
        z = self.z_index[batch[keys.ATOMIC_NUMBERS]]
        head = batch[keys.HEAD][b[recv]]
        pair = (self.w[head, z[recv], z[send]] * basis).sum(1) + 0.5 * (1.2 / r) ** 8 * fcut
        q_raw = torch.zeros_like(pos[:, 0]).index_add(0, recv, (self.wq[z[send]] * basis).sum(1))
        excess = torch.zeros_like(cell[:, 0, 0]).index_add(0, b, q_raw) - batch[keys.TOTAL_CHARGE]
        q = q_raw - (excess / torch.bincount(b).to(q_raw.dtype))[b]
        node = self.e0[z] + torch.zeros_like(q).index_add(0, recv, 0.5 * pair) + 0.1 * q ** 2
        energy = torch.zeros_like(cell[:, 0, 0]).index_add(0, b, node)
        out = {keys.ENERGY: energy, keys.NODE_ENERGY: node}
        if self.config.charges:
            out.update({keys.CHARGES: q, keys.DIPOLE: torch.zeros_like(cell[:, 0]).index_add(0, b, q[:, None] * pos)})
        wrt = [pos, disp] if compute_stress else [pos]
        grads = torch.autograd.grad(energy.sum(), wrt, allow_unused=True)
        out[keys.FORCES] = -grads[0]
        if compute_stress:
            volume = torch.linalg.det(cell).abs()
            out[keys.STRESS] = grads[1] / volume[:, None, None]
        return {k: v.detach() for k, v in out.items()}


def pair_model(elements=("Cu", "Au"), seed=0, **kw) -> PairModel:
    torch.manual_seed(seed)
    return PairModel(PairConfig(elements=list(elements), **kw)).double()


def foundation_model(seed: int = 0, elements=("Cu", "Au"), **overrides):
    """A small float64 FoundationModel (random init, smooth): 8 channels, invariant features, r_max 4.5 Å."""
    from foundation import FoundationModel, ModelConfig
    torch.manual_seed(seed)
    fields = dict(num_channels=8, max_L=0, r_max=4.5, num_bessel=6, radial_mlp=[16, 16], avg_num_neighbors=20.0,
                  heads=["pbe", "r2scan"], scale={"pbe": 20.0, "r2scan": 15.0}, dtype="float64")
    return FoundationModel(ModelConfig.preset("small", elements=list(elements), **{**fields, **overrides}))


def cu_au_bulk(seed=1, rattle=0.05) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 1))
    atoms.symbols[::3] = "Au"
    atoms.rattle(rattle, seed=seed)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * np.random.default_rng(seed).standard_normal((3, 3))),
                   scale_atoms=True)
    return atoms


def slab() -> Atoms:
    atoms = fcc111("Cu", size=(2, 2, 3), a=3.7, vacuum=6.0)
    atoms.symbols[-2:] = "Au"
    atoms.rattle(0.05, seed=3)
    return atoms  # pbc (True, True, False)


def cluster() -> Atoms:
    atoms = Atoms("Cu4Au2", positions=np.random.default_rng(2).uniform(0, 4.5, (6, 3)))
    atoms.positions += np.random.default_rng(5).normal(0, 0.01, (6, 3))
    return atoms


@pytest.mark.parametrize("make", [cu_au_bulk, slab, cluster], ids=["bulk", "slab", "molecule"])
def test_forces_match_ase_numerical_forces(make):
    atoms = make()
    atoms.calc = FoundationCalculator(pair_model(), dtype="float64")
    analytic = atoms.get_forces()
    numeric = atoms.calc.calculate_numerical_forces(atoms, d=1e-4)
    assert np.abs(analytic).max() > 1e-2  # a real test: forces are not trivially zero
    np.testing.assert_allclose(analytic, numeric, atol=1e-6)
    e = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == e
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), e, rtol=1e-12)


def test_stress_matches_ase_numerical_stress_for_bulk_and_slab_and_is_absent_for_molecules():
    for make in (cu_au_bulk, slab):  # a slab's stress: the strain derivative over the whole cell, vacuum included
        atoms = make()
        atoms.calc = FoundationCalculator(pair_model(), dtype="float64")
        analytic = atoms.get_stress()
        numeric = atoms.calc.calculate_numerical_stress(atoms, d=1e-6)
        assert np.abs(analytic).max() > 1e-4
        np.testing.assert_allclose(analytic, numeric, atol=1e-7)
    molecule_like = cluster()
    molecule_like.calc = FoundationCalculator(pair_model())
    with pytest.raises(PropertyNotImplementedError, match="needs a periodic direction"):
        molecule_like.get_stress()
    assert "stress" not in molecule_like.calc.results and "energy" in molecule_like.calc.results
    flat = fcc111("Cu", size=(2, 2, 2), a=3.7)  # periodic in-plane, but the cell has no height: no volume
    flat.calc = FoundationCalculator(pair_model())
    with pytest.raises(PropertyNotImplementedError, match="volume 0"):
        flat.get_stress()
    bulk_no_stress = cu_au_bulk()
    bulk_no_stress.calc = FoundationCalculator(pair_model(), compute_stress=False)
    with pytest.raises(PropertyNotImplementedError, match="compute_stress=False"):
        bulk_no_stress.get_stress()


def test_masked_cell_filter_relaxes_the_periodic_directions_of_a_slab():
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS
    atoms = fcc111("Cu", size=(2, 2, 3), a=3.7, vacuum=6.0)
    atoms.set_cell(atoms.cell.array * [1.04, 1.04, 1.0], scale_atoms=True)  # in-plane tension
    atoms.calc = FoundationCalculator(pair_model(elements=("Cu",), seed=2))
    c0, s0 = atoms.cell.array.copy(), atoms.get_stress()
    opt = BFGS(FrechetCellFilter(atoms, mask=[1, 1, 0, 0, 0, 1]), logfile=None)
    assert opt.run(fmax=0.002, steps=100)
    assert atoms.calc.neighbors.builds < opt.nsteps / 2  # the skin list follows the changing cell
    s1 = atoms.get_stress()
    assert np.abs(s1[[0, 1, 5]]).max() < 0.1 * np.abs(s0[[0, 1, 5]]).max()  # in-plane stress relaxed
    assert np.abs(atoms.cell.array[:2] - c0[:2]).max() > 1e-2  # the in-plane cell moved ...
    np.testing.assert_allclose(atoms.cell.array[2], c0[2], atol=1e-12)  # ... the vacuum direction did not


def test_skin_neighbor_list_gives_the_rebuilt_list_and_rebuilds_only_when_needed():
    atoms = cu_au_bulk(rattle=0.0)
    nl = SkinNeighborList(r_max=4.0, skin=0.6)
    rng = np.random.default_rng(0)

    def check():
        got = nl(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
        ref = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])

    for _ in range(40):
        atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
        check()
    assert 1 < nl.builds < 40  # reused between rebuilds, rebuilt once atoms moved more than skin/2
    builds = nl.builds
    wrapped = 0
    for _ in range(40):  # NPT-like: small random strains with the atoms carried along, thermal motion, wrapping
        strain = np.eye(3) + rng.normal(0, 0.004, (3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.positions += rng.normal(0, 0.01, atoms.positions.shape)
        before = atoms.positions.copy()
        atoms.wrap()  # atoms that left the cell come back in through the opposite face (torch-sim does this)
        wrapped += int(np.abs(atoms.positions - before).max() > 1.0)
        check()
    assert wrapped >= 5 and nl.builds - builds < 10  # the list survives cell changes and wrapping ...
    builds = nl.builds
    atoms.set_cell(atoms.cell.array * 0.9, scale_atoms=True)
    check()
    assert nl.builds == builds + 1  # ... until the deformation could bring pairs from beyond the skin


def test_md_with_skin_equals_rebuilding_every_step():
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    model = pair_model()
    traj = {}
    for skin in (0.0, 1.0):
        atoms = cu_au_bulk()
        MaxwellBoltzmannDistribution(atoms, temperature_K=1500, rng=np.random.default_rng(4))
        atoms.calc = FoundationCalculator(model, dtype="float64", skin=skin)
        dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
        frames = []

        def record(atoms=atoms, frames=frames):
            frames.append((atoms.get_potential_energy(), atoms.get_forces().copy()))
        dyn.attach(record, interval=1)
        dyn.run(30)
        traj[skin] = (frames, atoms.calc.neighbors.builds)
    (f0, b0), (f1, b1) = traj[0.0], traj[1.0]
    assert b0 == 31 and b1 < b0
    for (e0, F0), (e1, F1) in zip(f0, f1):
        assert abs(e0 - e1) <= 1e-12 * max(1.0, abs(e0))
        np.testing.assert_allclose(F0, F1, rtol=0, atol=1e-12)


def test_heads_dtypes_and_unknown_elements():
    model = pair_model()
    atoms = cu_au_bulk()
    e = {}
    for head in ("pbe", "r2scan"):
        atoms.calc = FoundationCalculator(model, head=head)
        e[head] = atoms.get_potential_energy()
    assert abs(e["pbe"] - e["r2scan"]) > 1e-6  # the heads are different readouts
    with pytest.raises(ValueError, match="not a head"):
        FoundationCalculator(model, head="ccsd")
    atoms.calc = FoundationCalculator(pair_model(), dtype="float32")
    f32 = atoms.get_potential_energy()
    assert atoms.calc.model.w.dtype == torch.float32
    atoms.calc = FoundationCalculator(pair_model(), dtype="float64")
    assert abs(f32 - atoms.get_potential_energy()) < 1e-4 * len(atoms)
    with pytest.raises(ValueError, match="float32"):
        FoundationCalculator(pair_model(), dtype="bfloat16")
    water = molecule("H2O")
    water.calc = FoundationCalculator(pair_model())
    with pytest.raises(ValueError, match=r"\['H', 'O'\]"):
        water.get_potential_energy()


def test_calculator_works_on_its_own_copy_of_the_model():
    model = pair_model().train()  # float64, training mode
    atoms = cu_au_bulk()
    calc64 = FoundationCalculator(model, dtype="float64")
    e64 = calc64.get_potential_energy(atoms)
    calc32 = FoundationCalculator(model, dtype="float32")  # must not turn calc64 (or the model) into float32
    assert model.w.dtype == torch.float64 and model.training  # the model passed in is untouched
    assert calc64.model.w.dtype == torch.float64 and calc32.model.w.dtype == torch.float32
    atoms.rattle(0.01, seed=9)
    reference = FoundationCalculator(pair_model(), dtype="float64").get_potential_energy(atoms)
    assert abs(calc64.get_potential_energy(atoms) - reference) < 1e-12 and abs(reference - e64) > 1e-6
    with torch.no_grad():
        model.w.mul_(2.0)  # later changes to the model do not reach a calculator made before them
    atoms.rattle(0.01, seed=10)
    assert abs(calc64.get_potential_energy(atoms) - FoundationCalculator(pair_model()).get_potential_energy(atoms)) \
        < 1e-12


def test_implemented_properties_follow_the_model():
    always = {"energy", "free_energy", "forces", "stress", "energies"}
    for model, charged in ((pair_model(), True), (pair_model(charges=False), False), (foundation_model(), False),
                           (foundation_model(long_range={"kind": "coulomb"}), True)):
        props = set(FoundationCalculator(model).implemented_properties)
        assert always <= props and ({"charges", "dipole"} <= props) == charged
        assert charged or not {"charges", "dipole"} & props
    atoms = cluster()
    atoms.calc = FoundationCalculator(pair_model(charges=False))
    with pytest.raises(PropertyNotImplementedError, match="charges property not implemented"):
        atoms.get_charges()
    assert "charges" in FoundationCalculator.implemented_properties  # the class lists what a model can give


def test_charges_follow_total_charge_and_dipole_is_reported():
    atoms = cluster()
    atoms.calc = FoundationCalculator(pair_model())
    q0 = atoms.get_charges()
    assert abs(q0.sum()) < 1e-12 and np.abs(q0).max() > 1e-3
    np.testing.assert_allclose(atoms.get_dipole_moment(), (q0[:, None] * atoms.positions).sum(0), atol=1e-12)
    atoms.info["charge"] = -1
    atoms.calc = FoundationCalculator(pair_model())
    assert abs(atoms.get_charges().sum() + 1) < 1e-12


def test_calculate_many_matches_one_by_one():
    model = pair_model()
    structures = [cu_au_bulk(seed=s) for s in range(3)] + [slab(), cluster(), cu_au_bulk(seed=7)]
    calc = FoundationCalculator(model)
    many = calc.calculate_many(structures, max_atoms=40)
    for atoms, res in zip(structures, many):
        atoms.calc = FoundationCalculator(model)
        assert abs(res["energy"] - atoms.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(res["charges"], atoms.get_charges(), atol=1e-10)
        assert ("stress" in res) == bool(atoms.pbc.any())  # bulk and slab, not the molecule
        if atoms.pbc.any():
            np.testing.assert_allclose(res["stress"], atoms.get_stress(), atol=1e-10)


def small_structures() -> dict[str, Atoms]:
    """4-atom strained bulk (an atom sees its own images), 6-atom slab, 6-atom cluster: cheap finite differences."""
    bulk4 = bulk("Cu", "fcc", a=3.7, cubic=True)
    bulk4.symbols[0] = "Au"
    bulk4.rattle(0.08, seed=4)
    bulk4.set_cell(bulk4.cell.array @ (np.eye(3) + 0.03 * np.random.default_rng(4).standard_normal((3, 3))),
                   scale_atoms=True)
    slab6 = fcc111("Cu", size=(2, 1, 3), a=3.7, vacuum=6.0)
    slab6.symbols[-1] = "Au"
    slab6.rattle(0.08, seed=5)
    return {"bulk": bulk4, "slab": slab6, "molecule": cluster()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bulk", "slab", "molecule"])
def test_foundation_model_passes_ase_numerical_checks(name):
    atoms = small_structures()[name]
    atoms.calc = FoundationCalculator(foundation_model(), head="r2scan", dtype="float64")
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2
    np.testing.assert_allclose(forces, atoms.calc.calculate_numerical_forces(atoms, d=1e-4), atol=1e-6)
    if atoms.pbc.any():  # bulk and slab
        stress = atoms.get_stress()
        assert np.abs(stress).max() > 1e-4
        np.testing.assert_allclose(stress, atoms.calc.calculate_numerical_stress(atoms, d=1e-6), atol=1e-7)
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy(), rtol=1e-12)


@pytest.mark.slow
def test_slab_stress_with_the_ewald_head_matches_finite_differences():
    atoms = small_structures()["slab"]  # latent charges, Ewald sum in the cell with its vacuum
    atoms.calc = FoundationCalculator(foundation_model(long_range={"kind": "latent_ewald"}), dtype="float64")
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, atoms.calc.calculate_numerical_stress(atoms, d=1e-6), atol=1e-7)


def test_foundation_model_batched_equals_single_and_skin_equals_rebuild():
    model = foundation_model()
    structures = [cu_au_bulk(seed=s) for s in range(2)] + [slab(), cluster()]
    many = FoundationCalculator(model).calculate_many(structures, max_atoms=30)
    for atoms, res in zip(structures, many):
        atoms.calc = FoundationCalculator(model, skin=0.0)
        assert abs(res["energy"] - atoms.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-10)
    atoms = cu_au_bulk()
    fresh, cached = FoundationCalculator(model, skin=0.0), FoundationCalculator(model, skin=1.0)
    rng = np.random.default_rng(0)
    for _ in range(8):
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        r0 = fresh.get_property("forces", atoms).copy()
        r1 = cached.get_property("forces", atoms).copy()
        np.testing.assert_allclose(r0, r1, rtol=0, atol=1e-12)
    assert cached.neighbors.builds < fresh.neighbors.builds


@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_coincident_atoms_are_refused_with_the_convert_rule(gap):
    """Regression (issue 18.10): 0 Å gave a NaN energy and 0.05 Å a finite one, both silently."""
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [gap, 0, 0]])
    atoms.calc = FoundationCalculator(pair_model(), dtype="float64")
    with pytest.raises(ValueError, match=r"structure AuCu: atoms [01] and [01] .* closer than 0.1 Å; .*fix the str"):
        atoms.get_potential_energy()
    atoms.positions[1, 0] = 2.5
    assert np.isfinite(atoms.get_potential_energy())


def _far_apart_energy() -> float:
    calc = FoundationCalculator(pair_model(), dtype="float64")
    far = Atoms("CuAu", positions=[[0, 0, 0], [1e6, 0, 0]])
    far.calc = calc
    alone = [Atoms(s, positions=[[0, 0, 0]]) for s in ("Cu", "Au")]
    return far.get_potential_energy() - sum(calc.get_potential_energy(a) for a in alone)


def test_atoms_1e6_angstrom_apart_do_not_kill_the_calculator():
    """Regression (issue 18.9): SIGFPE (exit -8) in the neighbor list; now two isolated atoms' energies."""
    from forked import run_forked
    code, difference = run_forked(_far_apart_energy)
    assert code == 0, f"the calculator killed its process (exit {code})"
    assert abs(difference) < 1e-9


@pytest.mark.parametrize("cell, message", [([[3, 0, 0], [0, 3, 0], [3, 3, 0]], "coplanar"), (None, "zero length")])
def test_a_degenerate_periodic_cell_is_a_named_error(cell, message):
    """Regression (issue 18.12): a coplanar cell gave vesin's raw RuntimeError ("box matrix is not invertible")."""
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 1.0]], cell=cell, pbc=True)
    atoms.calc = FoundationCalculator(pair_model(), dtype="float64")
    with pytest.raises(ValueError, match=f"structure Cu2: .*{message}.*fix the structure"):
        atoms.get_potential_energy()
