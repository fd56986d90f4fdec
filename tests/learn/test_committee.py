"""CommitteeModel: members differ, the reported mean and spread equal those computed independently from the
members, a committee saves/loads (and pushes/pulls through the Hub protocol) like a model, and the calculator and
``foundation md`` report the uncertainty."""
from __future__ import annotations

import json

import numpy as np
import pytest
from learn_helpers import cuau, tiny_model

from foundation import FoundationCalculator, FoundationModel
from foundation.learn import CommitteeConfig, CommitteeModel


@pytest.fixture(scope="module")
def committee():
    return CommitteeModel.from_members([tiny_model(s) for s in range(3)])


def member_results(committee, atoms):
    out = []
    for m in committee.members:
        a = atoms.copy()
        a.calc = FoundationCalculator(m, dtype="float64")
        out.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    return out


def test_members_differ_and_spread_is_the_std_of_the_members(committee):
    atoms = cuau(1)
    members = member_results(committee, atoms)
    forces = np.stack([f for _, f, _ in members])                       # (K, n, 3)
    energies = np.array([e for e, _, _ in members])
    assert np.abs(forces[0] - forces[1]).max() > 1e-3                   # members give different forces
    atoms.calc = FoundationCalculator(committee, dtype="float64")
    res = atoms.calc.get_property("forces", atoms) is not None and atoms.calc.results
    mean = forces.mean(0)
    per_atom = np.sqrt(((forces - mean) ** 2).sum(-1).mean(0))         # independent numpy std over members
    np.testing.assert_allclose(res["forces"], mean, atol=1e-10)
    np.testing.assert_allclose(res["energy"], energies.mean(), atol=1e-10)
    np.testing.assert_allclose(res["stress"], np.mean([s for _, _, s in members], axis=0), atol=1e-10)
    np.testing.assert_allclose(res["forces_uncertainty"], per_atom, atol=1e-10)
    np.testing.assert_allclose(res["max_devi_f"], per_atom.max(), atol=1e-10)
    np.testing.assert_allclose(res["energy_uncertainty"], np.std(energies), atol=1e-10)
    assert res["max_devi_f"] > 1e-3


def test_batched_committee_gives_each_structure_its_own_max_devi(committee):
    structures = [cuau(s) for s in range(3)]
    calc = FoundationCalculator(committee, dtype="float64")
    batched = calc.calculate_many(structures)
    for atoms, res in zip(structures, batched):
        atoms.calc = FoundationCalculator(committee, dtype="float64")
        atoms.get_forces()
        np.testing.assert_allclose(res["max_devi_f"], atoms.calc.results["max_devi_f"], atol=1e-10)
        np.testing.assert_allclose(res["forces_uncertainty"], atoms.calc.results["forces_uncertainty"], atol=1e-10)


def test_calculator_lists_the_uncertainties(committee):
    props = FoundationCalculator(committee).implemented_properties
    assert {"energy_uncertainty", "forces_uncertainty", "max_devi_f"} <= set(props)
    atoms = cuau(2)
    atoms.calc = FoundationCalculator(committee)
    assert atoms.calc.get_property("max_devi_f", atoms) == atoms.calc.results["max_devi_f"]
    assert "max_devi_f" not in FoundationCalculator(committee.members[0]).implemented_properties


def test_recalibration_scales_the_uncertainty_but_not_max_devi(committee, tmp_path):
    atoms = cuau(3)
    raw = FoundationCalculator(committee)
    raw.calculate(atoms, ["forces"])
    scaled_model = CommitteeModel.from_members(list(committee.members), recalibration=2.5)
    scaled = FoundationCalculator(scaled_model)
    scaled.calculate(atoms, ["forces"])
    np.testing.assert_allclose(scaled.results["forces_uncertainty"], 2.5 * raw.results["forces_uncertainty"])
    np.testing.assert_allclose(scaled.results["energy_uncertainty"], 2.5 * raw.results["energy_uncertainty"])
    assert scaled.results["max_devi_f"] == pytest.approx(raw.results["max_devi_f"])


def test_save_load_round_trip(committee, tmp_path):
    committee.set_recalibration(1.7)
    try:
        committee.save_pretrained(tmp_path / "c")
    finally:
        committee.set_recalibration(1.0)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_info"]["class"] == "CommitteeModel"
    assert cfg["model_config"]["committee_size"] == 3 and cfg["model_config"]["recalibration"] == 1.7
    assert (tmp_path / "c" / "README.md").is_file()
    for cls in (CommitteeModel, FoundationModel):   # FoundationModel.from_pretrained dispatches on the class name
        loaded = cls.from_pretrained(tmp_path / "c")
        assert isinstance(loaded, CommitteeModel) and loaded.config.recalibration == 1.7
        for a, b in zip(loaded.members, committee.members):
            for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
                assert np.array_equal(p.numpy(), q.numpy()), n
    calc = FoundationCalculator.from_pretrained(str(tmp_path / "c"))
    assert isinstance(calc.model, CommitteeModel)


_HUB = """
import json, sys
sys.path.insert(0, {here!r})
from learn_helpers import tiny_model
from foundation import FoundationModel
from foundation.learn import CommitteeModel
committee = CommitteeModel.from_members([tiny_model(s) for s in range(2)], recalibration=1.3)
sha = committee.push_to_hub("org/committee")
loaded = FoundationModel.from_pretrained("org/committee", revision=sha)
same = all((a == b).all().item() for a, b in zip(loaded.state_dict().values(), committee.state_dict().values()))
print("RESULT" + json.dumps([type(loaded).__name__, loaded.config.size, loaded.config.recalibration, same]))
"""


@pytest.mark.slow
def test_hub_push_and_pull(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from foundation.hubserver import serve_in_thread
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "test-token",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _HUB.format(here=str(Path(__file__).parent))], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT", 1)[1]) == ["CommitteeModel", 2, 1.3, True]


def test_bad_committees(committee, tmp_path):
    with pytest.raises(ValueError, match="at least 2 members"):
        CommitteeModel.from_members([tiny_model(0)])
    with pytest.raises(ValueError, match="at least 2 members"):
        CommitteeConfig(tiny_model(0).config, 1)
    with pytest.raises(ValueError, match="differs from member 0"):
        CommitteeModel.from_members([tiny_model(0), tiny_model(1, elements=("Cu", "Ag"))])
    tiny_model(0).save_pretrained(tmp_path / "single")
    with pytest.raises(ValueError, match="holds a FoundationModel, not a CommitteeModel"):
        CommitteeModel.from_pretrained(tmp_path / "single")
    assert type(FoundationModel.from_pretrained(tmp_path / "single")) is FoundationModel


def test_md_logs_max_devi_per_frame(committee, tmp_path):
    from ase.io import write

    from foundation.md import md
    committee.save_pretrained(tmp_path / "c")
    write(tmp_path / "cell.xyz", cuau(4))
    md(str(tmp_path / "c"), tmp_path / "cell.xyz", steps=6, temperature_k=300, ensemble="nvt", interval=2,
       log=tmp_path / "md.log", trajectory=tmp_path / "md.traj")
    rows = np.loadtxt(tmp_path / "md.log.devi")
    assert rows.shape == (4, 6)          # steps 0, 2, 4, 6
    assert np.array_equal(rows[:, 0], [0, 2, 4, 6])
    assert np.all(rows[:, 2] >= rows[:, 4]) and np.all(rows[:, 2] > 0)   # max >= mean > 0
