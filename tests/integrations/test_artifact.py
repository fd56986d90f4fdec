"""The TorchScript artifact: every preset (L = 0/1/2 and the student), several heads, the charge embedding, the
long-range head (erf-Coulomb and Ewald, PME refused), bad input, the CLI, and the torch-only example run in a process
that cannot import foundation, all against FoundationCalculator."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111, molecule
from ase.io import read, write

from foundation.calculator import FoundationCalculator
from foundation.cli import main as cli_main
from foundation.integrations.artifact import build_artifact, export_torchscript, read_metadata
from foundation.model.backbone import FoundationModel
from foundation.model.config import ModelConfig
from foundation.model.presets import preset_fields

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "artifact_example.py"
# runs a script where importing foundation or e3nn fails (what a machine without them sees)
BLOCKER = ("import sys, runpy\n"
          "class Block:\n"
          "    def find_spec(self, name, path=None, target=None):\n"
          "        if name.split('.')[0] in ('foundation', 'e3nn'):\n"
          "            raise ImportError('blocked: ' + name)\n"
          "sys.meta_path.insert(0, Block())\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")
TINY = dict(num_channels=8, max_ell=2, radial_mlp=[16], readout_mlp=4, r_max=4.0, correlation=2, num_bessel=6)


def make_model(seed: int = 0, **fields) -> FoundationModel:
    """A random model on H, C, O, Si, Cu with two heads whose statistics differ."""
    torch.manual_seed(seed)
    fields = {**TINY, "max_L": 1, **fields}
    heads = ["pbe", "wb97"]
    return FoundationModel(ModelConfig(
        elements=["H", "C", "O", "Si", "Cu"], heads=heads, avg_num_neighbors=6.0,
        atomic_energies={"pbe": [-1.0, -2.0, -3.0, -4.0, -5.0], "wb97": [-1.5, -2.5, -3.5, -4.5, -5.5]},
        scale={"pbe": 1.5, "wb97": 0.7}, shift={"pbe": 0.1, "wb97": -0.2}, **fields))


def structures() -> list:
    """A molecule, a bulk cell and a slab (partial pbc), rattled."""
    mol = molecule("CH3CH2OH")
    si = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    for k, atoms in enumerate((mol, si, slab)):
        atoms.rattle(0.05, seed=k)
    return [mol, si, slab]


def artifact_inputs(atoms, r_max: float, charge: float = 0.0) -> dict:
    from foundation.data.graph import neighbor_list
    edges, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, r_max)
    cell = torch.tensor(atoms.cell.array)
    return {"pos": torch.tensor(atoms.positions), "atomic_numbers": torch.tensor(atoms.numbers),
            "cell": cell.unsqueeze(0), "pbc": torch.tensor(atoms.pbc).unsqueeze(0),
            "edge_index": torch.tensor(edges), "shifts": torch.tensor(unit) @ cell,
            "total_charge": torch.tensor([charge])}


def assert_matches(artifact, model, atoms, head=None, charge: float = 0.0, tol: float = 1e-10):
    atoms = atoms.copy()
    atoms.info["charge"] = charge
    atoms.calc = FoundationCalculator(model, head=head, dtype=model.config.dtype)
    out = artifact(artifact_inputs(atoms, model.config.r_max, charge))
    assert abs(float(out["energy"][0]) - atoms.get_potential_energy()) < tol
    np.testing.assert_allclose(out["forces"].numpy(), atoms.get_forces(), atol=tol, rtol=0)
    if atoms.pbc.any():
        full = atoms.get_stress(voigt=False)
        np.testing.assert_allclose(out["stress"][0].numpy(), full, atol=tol, rtol=0)
        volume = atoms.get_volume()
        np.testing.assert_allclose(out["virials"][0].numpy(), -full * volume, atol=tol * volume, rtol=0)
    else:
        assert float(out["stress"].abs().max()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "medium", "large", "student"])
def test_every_preset_matches_the_calculator(preset):
    fields = preset_fields(preset)
    fields.update(num_channels=16, radial_mlp=[16])  # the preset's architecture (L, ell, correlation, r_max), narrow
    model = make_model(seed=1, **fields)
    artifact = build_artifact(model)
    for atoms in structures():
        assert_matches(artifact, model, atoms)


def test_heads_are_fixed_at_export_and_an_unknown_head_is_refused():
    model = make_model(max_L=2)
    mol = structures()[0]
    energies = []
    for head in ("pbe", "wb97"):
        artifact = build_artifact(model, head=head)
        assert_matches(artifact, model, mol, head=head)
        energies.append(float(artifact(artifact_inputs(mol, 4.0))["energy"][0]))
    assert abs(energies[0] - energies[1]) > 1e-3
    with pytest.raises(ValueError, match="head 'r2scan' is not a head"):
        build_artifact(model, head="r2scan")


def test_charge_embedding_and_ewald_head():
    model = make_model(max_L=0, max_total_charge=2, long_range={"kind": "latent_ewald", "sigma": 1.0})
    artifact = build_artifact(model)
    mol, si, slab = structures()
    for charge in (0.0, 1.0, -2.0):
        assert_matches(artifact, model, mol, charge=charge)
    assert_matches(artifact, model, si, charge=1.0)
    assert_matches(artifact, model, slab)
    with pytest.raises(torch.jit.Error, match="integer between -2 and 2"):
        artifact(artifact_inputs(mol, 4.0, charge=3.0))
    inputs = artifact_inputs(mol, 4.0)
    del inputs["total_charge"]
    with pytest.raises(torch.jit.Error, match="embeds the total charge"):
        artifact(inputs)


def test_coulomb_head_and_pme_is_a_clear_error():
    coulomb = make_model(long_range={"kind": "coulomb"})
    assert_matches(build_artifact(coulomb), coulomb, structures()[0])
    with pytest.raises(torch.jit.Error, match="only handles molecules"):
        build_artifact(coulomb)(artifact_inputs(structures()[1], 4.0))
    pme = make_model(long_range={"kind": "latent_ewald", "pme_threshold": 3})
    with pytest.raises(torch.jit.Error, match="PME"):
        build_artifact(pme)(artifact_inputs(structures()[1], 4.0))


def test_bad_input_is_a_clear_error_and_isolated_atoms_are_valid():
    model = make_model()
    artifact = build_artifact(model)
    mol, si, _ = structures()
    bad = artifact_inputs(mol, 4.0)
    bad["pos"][3, 1] = float("nan")
    with pytest.raises(torch.jit.Error, match="NaN or infinite coordinates for atoms \\[3\\]"):
        artifact(bad)
    bad = artifact_inputs(mol, 4.0)
    bad["atomic_numbers"][0] = 26
    with pytest.raises(torch.jit.Error, match="atomic numbers \\[26\\] are not elements"):
        artifact(bad)
    bad = artifact_inputs(si, 4.0)
    bad["cell"][0, 2] = 0.0
    with pytest.raises(torch.jit.Error, match="zero volume"):
        artifact(bad)
    bad = artifact_inputs(mol, 4.0)
    del bad["shifts"]
    with pytest.raises(torch.jit.Error, match="no 'shifts'"):
        artifact(bad)
    lonely = molecule("H2O")
    lonely.positions *= 5.0  # every pair beyond r_max = 4 Å: no edges at all
    out = artifact(artifact_inputs(lonely, 4.0))
    assert abs(float(out["energy"][0]) - (-3.0 - 2.0)) < 1e-12 and float(out["forces"].abs().max()) == 0.0


def test_stress_can_be_switched_off_and_float32_export(tmp_path):
    model = make_model()
    path = export_torchscript(model, tmp_path / "m32.pt", dtype="float32")
    loaded = torch.jit.load(str(path))
    assert read_metadata(path)["dtype"] == "float32" and model.dtype == torch.float64  # the model is unchanged
    si = structures()[1]
    assert_matches(loaded, model, si, tol=2e-4)
    loaded.compute_stress = False
    out = loaded(artifact_inputs(si, 4.0))
    assert "stress" not in out and "virials" not in out and out["forces"].dtype == torch.float32


@pytest.mark.slow
def test_cli_export_and_the_torch_only_example_without_foundation(tmp_path, capsys):
    model = make_model(max_L=1, max_total_charge=1)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "model.pt"
    assert cli_main(["export", "torchscript", str(tmp_path / "model"), "--out", str(out), "--head", "wb97"]) == 0
    assert "head 'wb97'" in capsys.readouterr().out
    assert cli_main(["export", "torchscript", str(tmp_path / "model"), "--out", str(out), "--head", "x"]) == 2
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    frames = structures()
    frames[0].info["charge"] = 1.0
    write(tmp_path / "frames.extxyz", frames)
    command = [sys.executable, "-S", "-c", BLOCKER, str(EXAMPLE), str(out), str(tmp_path / "frames.extxyz")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line, atoms in zip(lines, read(tmp_path / "frames.extxyz", index=":")):  # positions as written (8 decimals)
        got = json.loads(line)
        atoms.calc = FoundationCalculator(model, head="wb97")
        assert abs(got["energy"] - atoms.get_potential_energy()) < 1e-10
        np.testing.assert_allclose(got["forces"], atoms.get_forces(), atol=1e-10, rtol=0)
        if atoms.pbc.any():
            np.testing.assert_allclose(got["stress"], atoms.get_stress(voigt=False), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_the_deploy_page_example_runs_without_foundation(tmp_path):
    """docs/deploy.md's torch-only block, run where neither foundation nor e3nn can be imported, on a Si model
    exported as model.pt: its energy is the calculator's to 1e-10 eV (float64)."""
    import re
    text = (ROOT / "docs" / "deploy.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'torch.jit.load("model.pt")' in c]
    model = make_model(max_L=0)
    export_torchscript(model, tmp_path / "model.pt")
    (tmp_path / "example.py").write_text(code)
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-S", "-c", BLOCKER, str(tmp_path / "example.py")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    energy = float(proc.stdout.split()[0])
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.calc = FoundationCalculator(model)
    assert abs(energy - atoms.get_potential_energy()) < 1e-10


def test_components_of_imported_mace_models_are_refused():
    model = make_model(max_L=0)
    model.config.energy_form = "mace"
    with pytest.raises(ValueError, match="energy_form"):
        build_artifact(model)
