"""FoundationModel conformance (shared helpers in foundation.testing) and the forward-pass contract."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from model_factory import ELEMENTS, tiny_model
from torch_geometric.data import Batch

from foundation import FoundationModel, ModelConfig, keys, testing
from foundation.data.graph import from_atoms


@pytest.mark.parametrize("max_L", [0, 1, 2])
def test_conformance_per_L(max_L, ethanol, small_cell, crystal):
    model = tiny_model(max_L=max_L)
    report = testing.check_all(model, ethanol, small_cell)
    assert report["crystal_stress_fd"] < 1e-6 and report["molecule_forces_fd"] < 1e-6
    testing.check_lattice_choice(model, crystal)
    testing.check_stress_fd(model, crystal)
    testing.check_rotation(model, crystal, seed=5)


@pytest.mark.parametrize("overrides", [dict(max_L=1, correlation=1), dict(max_L=1, correlation=2),
                                       dict(max_L=2, correlation=2, max_ell=2), dict(max_L=0, num_layers=1),
                                       dict(max_L=1, num_layers=3, correlation=3)])
def test_conformance_variants(overrides, ethanol, small_cell):
    testing.check_all(tiny_model(**overrides), ethanol, small_cell)


@pytest.mark.parametrize("max_L", [0, 2])
def test_conformance_float32(max_L, ethanol, small_cell, crystal):
    model = tiny_model(max_L=max_L, dtype="float32")
    assert model.dtype == torch.float32
    report = testing.check_all(model, ethanol, small_cell)
    assert "crystal_stress_fd" not in report
    testing.check_batch_consistency(model, [ethanol, crystal, small_cell])
    # float32 agrees with the same weights in float64 to float32 precision
    ref = tiny_model(max_L=max_L, dtype="float64")
    model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    a, b = testing.model_outputs(model, [crystal]), testing.model_outputs(ref, [crystal])
    assert abs(a[0]["energy"] - b[0]["energy"]) < 1e-3 * max(1.0, abs(b[0]["energy"]))
    assert np.abs(a[0]["forces"] - b[0]["forces"]).max() < 1e-3 * max(1.0, np.abs(b[0]["forces"]).max())


def test_mixed_batch_and_multiple_heads(ethanol, small_cell, crystal):
    model = tiny_model(heads=["pbe", "r2scan"], atomic_energies={"pbe": [-13.6, -1030.0, -2040.0, -4.5],
                                                                "r2scan": [-13.0, -1000.0, -2000.0, -4.0]},
                       scale={"pbe": 1.3, "r2scan": 0.8}, shift={"pbe": -0.7, "r2scan": 0.2})
    structures = [ethanol, small_cell, crystal, ethanol]
    testing.check_batch_consistency(model, structures, heads=[0, 1, 1, 1])
    testing.check_isolated_atoms(model)
    both = testing.model_outputs(model, [ethanol, ethanol], heads=[0, 1])
    assert abs(both[0]["energy"] - both[1]["energy"]) > 1.0
    assert np.abs(both[0]["forces"] - both[1]["forces"]).max() > 1e-3


def test_energy_is_local(ethanol):
    """Two molecules farther apart than r_max: the energy is the sum of the parts and forces are the parts'."""
    model = tiny_model(max_L=2)
    water = molecule("H2O")
    water.positions += [20.0, 0, 0]
    parts = testing.model_outputs(model, [ethanol, water])
    whole = testing.model_outputs(model, [ethanol + water])[0]
    assert abs(whole["energy"] - parts[0]["energy"] - parts[1]["energy"]) < 1e-9
    assert np.allclose(whole["forces"], np.vstack([parts[0]["forces"], parts[1]["forces"]]), atol=1e-10)
    assert np.all(whole["stress"] == 0)


def test_force_loss_double_backward_gradcheck(small_cell):
    """d(force loss)/d(weights) by double backward equals finite differences (torch gradcheck, float64)."""
    model = tiny_model(max_L=1)
    batch = Batch.from_data_list([from_atoms(small_cell, 4.0, dtype=torch.float64)])
    target = torch.randn(len(small_cell), 3, dtype=torch.float64)
    names = ["readouts.1.weight_out", "products.0.weights.L1_nu2", "interactions.1.radial.weights.1"]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(*values):
        state = dict(params, **dict(zip(names, values)))
        out = torch.func.functional_call(model, state, (batch,), dict(compute_forces=True, compute_stress=True,
                                                                      training=True))
        return ((out[keys.FORCES] - target) ** 2).mean() + out[keys.STRESS].pow(2).sum() + out[keys.ENERGY].sum()

    inputs = tuple(params[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_training_keeps_graph_and_eval_detaches(ethanol):
    model = tiny_model()
    batch = Batch.from_data_list([from_atoms(ethanol, 4.0)])
    out = model(batch, training=True)
    assert out[keys.FORCES].requires_grad
    out[keys.FORCES].pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    out = model(batch)
    assert not out[keys.FORCES].requires_grad
    with torch.no_grad():
        out2 = model(batch, compute_stress=True)
    assert torch.allclose(out[keys.FORCES], out2[keys.FORCES])


def test_hessian_vector_product_matches_finite_differences(small_cell):
    model = tiny_model(max_L=1)
    v = torch.from_numpy(np.random.default_rng(0).normal(size=(len(small_cell), 3)))
    graph = Batch.from_data_list([from_atoms(small_cell, 4.0, dtype=torch.float64)])
    hv = model.hessian_vector_product(graph, v)
    eps = 1e-4
    forces = []
    for sign in (1, -1):
        moved = small_cell.copy()
        moved.positions += sign * eps * v.numpy()
        forces.append(testing.model_outputs(model, [moved], stress=False)[0]["forces"])
    fd = -(forces[0] - forces[1]) / (2 * eps)
    assert np.abs(hv.numpy() - fd).max() < 1e-6 * np.abs(fd).max()
    several = model.hessian_vector_product(graph, torch.stack([v, 2 * v], dim=-1))
    assert torch.allclose(several[..., 1], 2 * hv)


def test_state_dict_is_strict_and_complete(tmp_path, ethanol):
    from safetensors.torch import load_file, save_file
    model = tiny_model(max_L=2)
    state = model.state_dict()
    assert set(state) == {n for n, _ in model.named_parameters()}  # constants are rebuilt from the config
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model.config.to_json(tmp_path / "config.json")
    torch.manual_seed(123)
    again = FoundationModel(ModelConfig.from_json(tmp_path / "config.json"))
    again.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    a, b = testing.model_outputs(model, [ethanol]), testing.model_outputs(again, [ethanol])
    assert a[0]["energy"] == b[0]["energy"]


def test_batch_dtype_is_converted_and_single_data_accepted(ethanol):
    model = tiny_model()
    g64 = from_atoms(ethanol, 4.0, dtype=torch.float64)
    g32 = from_atoms(ethanol, 4.0, dtype=torch.float32)
    e64 = model(Batch.from_data_list([g64]))[keys.ENERGY]
    e_single = model(g64)[keys.ENERGY]
    e32 = model(Batch.from_data_list([g32]))[keys.ENERGY]
    assert e64.dtype == torch.float64 and torch.allclose(e64, e_single)
    assert torch.allclose(e64, e32, atol=1e-4)


def test_clear_errors(ethanol):
    model = tiny_model()
    gold = from_atoms(Atoms("Au2", positions=[[0, 0, 0], [0, 0, 2.5]]), 4.0)
    with pytest.raises(ValueError, match="Au"):
        model(Batch.from_data_list([gold]))
    graph = from_atoms(ethanol, 4.0, head=3)
    with pytest.raises(ValueError, match="head"):
        model(Batch.from_data_list([graph]))
    bare = from_atoms(ethanol, None)
    with pytest.raises(ValueError, match="edge_index"):
        model(bare)
    with pytest.raises(ValueError, match="kind must be one of"):
        FoundationModel(ModelConfig(elements=ELEMENTS, long_range={"kind": "ewald"}))


def test_bf16_autocast_runs_and_stays_close(crystal):
    """Mixed precision (as the trainer's bf16 autocast on GPUs), here on the CPU: finite and close to float32."""
    model = tiny_model(max_L=1, dtype="float32")
    batch = Batch.from_data_list([from_atoms(crystal, 4.0, dtype=torch.float32)])
    ref = model(batch, compute_stress=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, compute_stress=True, training=True)
    interaction = ref[keys.ENERGY] - model.statistics.e0[0, model.element_index[batch.atomic_numbers]].sum()
    assert torch.isfinite(out[keys.FORCES]).all() and torch.isfinite(out[keys.STRESS]).all()
    assert abs(out[keys.ENERGY].float() - ref[keys.ENERGY]).item() < 0.05 * max(1.0, abs(interaction.item()))
    assert (out[keys.FORCES].float() - ref[keys.FORCES]).abs().max() < 0.05 * max(1.0, ref[keys.FORCES].abs().max())
