"""FoundationTorchSimModel: torch-sim's own validator, agreement with FoundationCalculator, batched relaxation,
NVE/NVT/NPT MD on several systems at once, the skin neighbor list, bad input."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

ts = pytest.importorskip("torch_sim", reason="the [torchsim] extra (torch-sim-atomistic) is not installed")
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

from foundation.calculator import FoundationCalculator  # noqa: E402
from foundation.integrations.torch_sim import FoundationTorchSimModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_calculator import _one_torch_thread, foundation_model, pair_model  # noqa: E402,F401

ELEMENTS = ("Si", "Fe")


def structures(seed: int = 0) -> list[Atoms]:
    """Three small periodic Si/Fe cells of different sizes and shapes, rattled (0.05 Å)."""
    si = bulk("Si", "diamond", a=5.5, cubic=True)
    fe = bulk("Fe", "bcc", a=2.9, cubic=True).repeat((2, 2, 1))
    mix = bulk("Si", "fcc", a=4.2).repeat((2, 2, 2))
    mix.symbols[::3] = "Fe"
    out = [si, fe, mix]
    for k, atoms in enumerate(out):
        atoms.rattle(0.05, seed=seed + k)
    return out


def test_passes_torch_sims_validator_in_float64_and_float32():
    for dtype in (torch.float64, torch.float32):
        model = FoundationTorchSimModel(foundation_model(elements=ELEMENTS), dtype=dtype)
        validate_model_outputs(model, torch.device("cpu"), dtype)
        assert model.dtype == dtype and model.compute_stress and model.compute_forces


def test_batched_outputs_equal_the_ase_calculator_per_structure():
    model = foundation_model(elements=ELEMENTS)
    wrapped = FoundationTorchSimModel(model, head="r2scan")
    systems = structures()
    out = wrapped(ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64))
    start = 0
    for b, atoms in enumerate(systems):
        atoms.calc = FoundationCalculator(model, head="r2scan")
        n = len(atoms)
        assert abs(out["energy"][b].item() - atoms.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), atoms.get_forces(), atol=1e-10)
        stress = atoms.get_stress(voigt=False)
        assert np.abs(stress).max() > 1e-4
        np.testing.assert_allclose(out["stress"][b].numpy(), stress, atol=1e-10)
        start += n
    # molecules (torch-sim pbc False): same energies and forces, zero stress (the model's rule for no periodicity)
    mols = [molecule("SiH4")[:1], Atoms("Si2Fe", positions=[[0, 0, 0], [2.3, 0, 0], [0.4, 2.1, 0.3]])]
    mols[0].positions[:] = 0.0
    out = wrapped(ts.io.atoms_to_state(mols, torch.device("cpu"), torch.float64))
    for b, atoms in enumerate(mols):
        atoms.calc = FoundationCalculator(model, head="r2scan")
        assert abs(out["energy"][b].item() - atoms.get_potential_energy()) < 1e-10
    assert torch.all(out["stress"] == 0)


def relax(systems, steps=None, tol=5e-3):
    model = FoundationTorchSimModel(pair_model(elements=ELEMENTS, charges=False))
    if steps is None:
        return model, ts.optimize(systems, model, optimizer=ts.frechet_cell_fire, max_steps=1000,
                                  convergence_fn=ts.generate_force_convergence_fn(tol))
    init, update = ts.frechet_cell_fire(model=model)
    state = init(ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64))
    for _ in range(steps):
        state = update(state)
    return model, state


@pytest.fixture(scope="module")
def relaxed():
    """The 3 structures relaxed together (positions and cell) by torch-sim's frechet_cell_fire, pair model."""
    return relax(structures())[1]


def test_batched_frechet_cell_fire_relaxes_every_system_and_batching_changes_nothing(relaxed):
    systems = structures()
    calc = FoundationCalculator(pair_model(elements=ELEMENTS, charges=False))
    start = [calc.get_potential_energy(a) for a in systems]
    assert relaxed.n_systems == 3 and np.all(relaxed.energy.numpy() < np.array(start) - 1e-2)
    for atoms in relaxed.to_atoms():  # the ASE calculator agrees that forces and stress vanish there
        assert np.abs(calc.get_forces(atoms)).max() < 5e-3
        assert np.abs(calc.get_stress(atoms)).max() * atoms.get_volume() / len(atoms) < 1e-2  # cell force, eV
    _, together = relax(systems, steps=15)
    for b, atoms in enumerate(systems):  # each system alone follows exactly the same path
        _, alone = relax([atoms], steps=15)
        mask = together.system_idx == b
        np.testing.assert_allclose(together.positions[mask].numpy(), alone.positions.numpy(), atol=1e-9)
        np.testing.assert_allclose(together.row_vector_cell[b].numpy(), alone.row_vector_cell[0].numpy(), atol=1e-9)


def nve_energies(skin: float, steps: int = 50) -> tuple[np.ndarray, np.ndarray, int]:
    """Total energies (steps, 3) eV and final positions of torch-sim NVE (1 fs, from 300 K) on the 3 structures."""
    model = FoundationTorchSimModel(foundation_model(elements=ELEMENTS), skin=skin)
    units = ts.units.MetalUnits
    init, update = ts.nve(model=model, dt=torch.tensor(0.001 * units.time), kT=torch.tensor(300 * units.temperature),
                          seed=0)
    state = init(ts.io.atoms_to_state(structures(), torch.device("cpu"), torch.float64))
    total = []
    for _ in range(steps):
        state = update(state)
        kinetic = ts.calc_kinetic_energy(masses=state.masses, momenta=state.momenta, system_idx=state.system_idx)
        total.append((state.energy + kinetic).numpy() / state.n_atoms_per_system.numpy())
    return np.array(total), state.positions.numpy(), model.neighbor_builds


def test_nve_conserves_energy_for_several_systems_at_once_and_the_skin_list_changes_nothing():
    total, positions, builds = nve_energies(skin=0.5)
    drift = np.abs(total - total[0]).max(axis=0)
    print(f"torch-sim NVE, 3 systems, 50 x 1 fs: max |Etot - Etot(0)| per atom {drift}; {builds} list builds")
    assert drift.shape == (3,) and np.all(drift < 1e-4)
    fresh_total, fresh_positions, fresh_builds = nve_energies(skin=0.0)  # a fresh list at every step
    assert fresh_builds == 3 * 51 and builds <= 3 * 5  # kept across steps, although torch-sim wraps positions
    np.testing.assert_allclose(total, fresh_total, rtol=0, atol=1e-12)
    np.testing.assert_allclose(positions, fresh_positions, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ensemble", ["nvt", "npt"])
def test_nvt_and_npt_langevin_run_several_systems(ensemble, relaxed):
    model = FoundationTorchSimModel(pair_model(elements=ELEMENTS, charges=False))
    systems = structures()
    volumes = np.array([a.get_volume() for a in systems])
    dt = 0.001  # ps
    # b_tau: torch-sim 0.3's default, 1 / (1000 dt), makes the cell mass 10^4 x too light and the barostat unstable
    kwargs = {"external_pressure": torch.tensor(0.0, dtype=torch.float64),
              "b_tau": torch.tensor(50 * dt * ts.units.MetalUnits.time, dtype=torch.float64)}
    integrator = ts.npt_langevin if ensemble == "npt" else ts.nvt_langevin
    final = ts.integrate(systems, model, integrator=integrator, n_steps=60, temperature=300.0, timestep=dt, seed=1,
                         **(kwargs if ensemble == "npt" else {}))
    assert final.n_systems == 3 and torch.isfinite(final.positions).all()
    moved = [np.abs(a.positions - b.positions).max() for a, b in zip(final.to_atoms(), systems)]
    assert min(moved) > 1e-2
    change = final.volume.numpy() - volumes
    if ensemble == "npt":  # at zero pressure every cell heads for its relaxed volume: the stress has the right sign
        assert np.all(np.abs(change) > 1e-4 * volumes)
        np.testing.assert_array_equal(np.sign(change), np.sign(relaxed.volume.numpy() - volumes))
    else:
        assert np.abs(change).max() < 1e-12 * volumes.max()
    assert model.neighbor_builds <= 3 * 5  # lists kept across steps (and, in NPT, across cell changes)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not a head"):
        FoundationTorchSimModel(foundation_model(elements=ELEMENTS), head="ccsd")
    with pytest.raises(ValueError, match="float32"):
        FoundationTorchSimModel(foundation_model(elements=ELEMENTS), dtype=torch.bfloat16)
    model = FoundationTorchSimModel(foundation_model(elements=ELEMENTS))
    state = ts.io.atoms_to_state(structures(), torch.device("cpu"), torch.float64)
    state.positions[-1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"systems \[2\] are not finite"):
        model(state)
    with pytest.raises(ValueError, match=r"\['Cu'\]"):
        model(ts.io.atoms_to_state([bulk("Cu", "fcc", a=3.6)], torch.device("cpu"), torch.float64))


@pytest.mark.slow
def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    """docs/deploy.md's torch-sim block, on a small Si model saved as my-model."""
    import json
    import re

    from foundation import FoundationModel, ModelConfig
    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "import torch_sim" in b]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = ModelConfig.preset("student", elements=["Si"], num_channels=8, radial_mlp=[8], dtype="float64")
    FoundationModel(config).save_pretrained(tmp_path / "my-model")
    exec(compile(block, "docs/deploy.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    volumes = [line for line in lines if line.startswith("volumes")]
    assert len(volumes) == 1 and all(np.isfinite(json.loads(volumes[0].split(":", 1)[1])))
