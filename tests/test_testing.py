"""The conformance helpers catch broken models (so model tests that pass them mean something)."""
import pytest
import torch
from ase.build import bulk, molecule

from foundation import FoundationModel, ModelConfig, keys, testing


class Broken(torch.nn.Module):
    """Wraps a model and corrupts one output the way a buggy implementation would."""

    def __init__(self, model, mode: str):
        super().__init__()
        self.model, self.mode = model, mode
        self.config, self.dtype = model.config, model.dtype

    def forward(self, batch, compute_forces=True, compute_stress=False, training=False):
        out = dict(self.model(batch, compute_forces=compute_forces, compute_stress=compute_stress))
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs).to(out[keys.ENERGY])
        if self.mode == "forces":
            out[keys.FORCES] = out[keys.FORCES] * 1.001
        elif self.mode == "stress" and keys.STRESS in out:
            out[keys.STRESS] = out[keys.STRESS].transpose(1, 2) * 1.001
        elif self.mode == "absolute_x":  # depends on where the structure is
            out[keys.ENERGY] = out[keys.ENERGY] + 1e-3 * torch.zeros_like(counts).index_add(
                0, batch.batch, batch.pos[:, 0].to(counts))
        elif self.mode == "cell":  # depends on the choice of lattice vectors
            out[keys.ENERGY] = out[keys.ENERGY] + 1e-3 * batch.cell[:, 0, 0].to(counts)
        elif self.mode == "batch_mixing":
            out[keys.ENERGY] = out[keys.ENERGY] + 1e-3 * out[keys.ENERGY].mean()
        elif self.mode == "offset":
            out[keys.ENERGY] = out[keys.ENERGY] + 1e-3 * counts
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FoundationModel(ModelConfig(elements=["H", "C", "O", "Cu"], num_channels=8, max_L=1, r_max=4.0,
                                       avg_num_neighbors=6.0, atomic_energies=[-1.0, -2.0, -3.0, -4.0]))


@pytest.fixture(scope="module")
def structures():
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=1)
    cell = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    cell.rattle(0.05, seed=2)
    return mol, cell


def test_healthy_model_passes(model, structures):
    report = testing.check_all(model, *structures)
    assert all(v < 1e-6 for v in report.values())


@pytest.mark.parametrize("mode, check", [
    ("forces", lambda m, mol, cell: testing.check_forces_fd(m, mol)),
    ("stress", lambda m, mol, cell: testing.check_stress_fd(m, cell)),
    ("absolute_x", lambda m, mol, cell: testing.check_translation(m, mol)),
    ("cell", lambda m, mol, cell: testing.check_lattice_choice(m, cell)),
    ("batch_mixing", lambda m, mol, cell: testing.check_batch_consistency(m, [mol, cell])),
    ("offset", lambda m, mol, cell: testing.check_isolated_atoms(m)),
])
def test_checks_catch_broken_models(model, structures, mode, check):
    with pytest.raises(AssertionError):
        check(Broken(model, mode), *structures)


def test_cutoff_check_catches_a_missing_envelope(model, structures, monkeypatch):
    """Without the polynomial envelope the Bessel basis still vanishes at r_max, but forces jump."""
    testing.check_cutoff_smoothness(model, structures[0])
    monkeypatch.setattr(model.radial_basis, "envelope", lambda r: (r < model.config.r_max).to(r.dtype))
    with pytest.raises(AssertionError, match="cutoff not smooth"):
        testing.check_cutoff_smoothness(model, structures[0])


def test_rotation_check_catches_a_non_equivariant_force(model, structures):
    class Frozen(Broken):
        def forward(self, batch, **kw):
            out = dict(self.model(batch, **kw))
            out[keys.FORCES] = out[keys.FORCES] + torch.tensor([1e-3, 0.0, 0.0]).to(out[keys.FORCES])
            return out
    with pytest.raises(AssertionError, match="rotation forces"):
        testing.check_rotation(Frozen(model, ""), structures[0])
