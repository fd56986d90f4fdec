"""``foundation.integrations.compiled`` on the tiniest model: one full graph (no break), compiled == eager in float64,
a new geometry with another edge count reuses the compiled graph, and ``FoundationCalculator(compile=True)``.

The tracing checks use the 'aot_eager' backend (dynamo + AOTAutograd, forward and backward, without inductor's C++
code generation): graph breaks, guards, exactness of the traced computation, in seconds. One test compiles with the
default backend, inductor (~30-40 s cold), and checks its kernels against eager. Inductor's speed is measured by
``scripts/bench_model.py --compiled``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from torch._dynamo.testing import CompileCounterWithBackend
from torch_geometric.data import Batch

import foundation.integrations.compiled as compiled_module
from foundation.calculator import FoundationCalculator
from foundation.data import from_atoms
from foundation.integrations.compiled import compile_model
from foundation.model.backbone import FoundationModel
from foundation.model.config import ModelConfig

TINY = dict(num_channels=8, num_layers=2, max_ell=2, radial_mlp=[16], readout_mlp=4, num_bessel=6, r_max=3.0)


def tiny_model() -> FoundationModel:
    torch.manual_seed(0)
    config = ModelConfig.preset("student", elements=["H", "C", "O"], dtype="float64", **TINY)
    model = FoundationModel(config).eval()
    model.set_statistics(atomic_energies=[-13.6, -1029.0, -2041.0], scale=0.7, shift=0.1)
    return model


def graph(atoms, r_max: float) -> Batch:
    return Batch.from_data_list([from_atoms(atoms, r_max, dtype=torch.float64)])


def test_compiled_equals_eager_without_graph_break_or_recompile(monkeypatch):
    torch._dynamo.reset()
    model = tiny_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_model(model, backend=counter)
    acid = molecule("CH3COOH")
    shapes = set()
    for seed in range(3):  # the second and third geometries have other edge counts and table widths
        atoms = acid.copy()
        if seed:
            atoms.positions *= 1.0 + 0.15 * seed
            atoms.rattle(0.05, seed=seed)
        g = graph(atoms, model.config.r_max)
        shapes.add(g.edge_index.shape[1])
        out, ref = compiled(g), model(g, compute_forces=True)
        np.testing.assert_allclose(out["energy"].numpy(), ref["energy"].detach().numpy(), rtol=1e-10)
        np.testing.assert_allclose(out["energies"].numpy(), ref["energies"].detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out["forces"].numpy(), ref["forces"].detach().numpy(), rtol=1e-10, atol=1e-12)
    assert len(shapes) == 3
    assert counter.frame_count == 1  # fullgraph=True: one graph, compiled once for every geometry
    # the calculator's opt-in path, given the compiled model above (a new one would be traced again)
    monkeypatch.setattr(compiled_module, "compile_model", lambda m, head=None, dtype=None, device="cpu": compiled)
    calc = FoundationCalculator(model, compile=True)
    atoms = acid.copy()
    atoms.calc = calc
    eager = FoundationCalculator(model).get_potential_energy(acid), FoundationCalculator(model).get_forces(acid)
    assert abs(atoms.get_potential_energy() - eager[0]) <= 1e-10 * abs(eager[0])
    np.testing.assert_allclose(atoms.get_forces(), eager[1], rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1 and counter.op_count > 0  # the calculator went through the compiled graph


@pytest.mark.slow
def test_inductor_compiles_and_equals_eager():
    """The default backend (inductor: C++ kernels built with the machine's compiler, ~40 s cold on 2 CPU cores, a
    few seconds from inductor's on-disk cache) gives the eager model's energy and forces in float64."""
    torch._dynamo.reset()
    model = tiny_model()
    g = graph(molecule("CH3COOH"), model.config.r_max)
    out, ref = compile_model(model)(g), model(g, compute_forces=True)
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"].detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"].detach().numpy(), rtol=1e-10, atol=1e-12)
