"""An imported mace model is a first-class model end to end (issue 14, item 4): the ``trained`` fixture (a Cu-Au
model trained with mace_run_train, float64) is imported, then fine-tuned by ``foundation finetune`` with every
strategy, used as the teacher of ``foundation distill``, pushed to a Hub-protocol server and run by ``foundation md``
from its repo id. Its license travels into every derived card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from foundation.cli import main as cli
from foundation.hubserver import serve_in_thread
from foundation.interop.mace import import_mace
from foundation.model.backbone import FoundationModel

FIXTURE = Path(__file__).parent / "fixtures" / "trained"
LICENSE = "academic-only-example"     # not ours: every derived card must carry it


def cuau_frames(n: int, seed: int) -> list:
    """``n`` rattled 4- and 8-atom Cu-Au fcc cells with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((1, 1, 1 + i % 2))
        atoms.numbers = rng.choice([29, 79], len(atoms))
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **labels)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    import_mace(FIXTURE, root / "imported", license=LICENSE)
    for name, (n, seed) in {"train": (8, 0), "valid": (4, 1), "replay": (6, 2), "seeds": (2, 3)}.items():
        write(root / f"{name}.extxyz", cuau_frames(n, seed))
    return root


def finetune_recipe(root: Path, out: str, **sections) -> dict:
    values = {"base": {"model": str(root / "imported")}, "out_dir": str(root / out), "max_steps": 2,
              "log_every": 1, "valid_every": 100, "checkpoint_every": 100, "progress": False, "seed": 0,
              "data": {"train": [str(root / "train.extxyz")], "valid": [str(root / "valid.extxyz")],
                       "max_atoms": 16},
              "optim": {"lr": 0.005}, "ema": {"enabled": False}, "engine": {"zero_stage": 0}}
    values.update(sections)
    return values


def run_recipe(root: Path, verb: str, values: dict) -> Path:
    path = root / f"{Path(values['out_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli([verb, str(path)]) == 0
    return Path(values["out_dir"]) / "model"


STRATEGIES = {
    "full": {},
    "frozen": {"finetune": {"strategy": "frozen"}},
    "lora": {"finetune": {"strategy": "lora"}, "lora": {"rank": 2}},
    "replay": {"finetune": {"strategy": "replay", "head": "emt"},
               "replay": {"data": ["REPLAY"], "samples": 4, "weight": 0.5}},
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_finetune_an_imported_base_with_every_strategy(work, strategy):
    sections = json.loads(json.dumps(STRATEGIES[strategy]).replace("REPLAY", str(work / "replay.extxyz")))
    out = run_recipe(work, "finetune", finetune_recipe(work, f"ft-{strategy}", **sections))
    base = FoundationModel.from_pretrained(work / "imported")
    tuned = FoundationModel.from_pretrained(out)
    assert tuned.config.elements == base.config.elements and tuned.config.energy_form == base.config.energy_form
    if strategy == "replay":
        assert set(tuned.config.heads) == {*base.config.heads, "emt"}
    before = base.state_dict()
    changed = [k for k, v in tuned.state_dict().items()
               if k in before and v.shape == before[k].shape and not torch.equal(v.double(), before[k].double())]
    assert changed, "fine-tuning changed no weight of the imported model"
    if strategy == "frozen":
        assert not [k for k in changed if k.startswith(("interactions", "products", "node_embedding"))]
    assert tuned.hub_metadata.get("license") == LICENSE
    assert f"license: {LICENSE}" in (out / "README.md").read_text()


@pytest.mark.slow
def test_distill_with_an_imported_teacher(work):
    values = {"out_dir": str(work / "distilled"), "name": "test/student",
              "teacher": {"model": str(work / "imported")},
              "model": {"preset": "student", "overrides": {"num_channels": 8, "max_ell": 2, "radial_mlp": [16],
                                                           "readout_mlp": 4, "correlation": 2, "num_bessel": 6}},
              "seeds": {"files": [str(work / "seeds.extxyz")], "reference": [str(work / "valid.extxyz")]},
              "configurations": {"temperatures": [300.0], "md_steps": 2, "md_interval": 2, "rattle_copies": 1,
                                 "strain_copies": 0},
              "labels": {"hvp_vectors": 1, "cache_dir": str(work / "distill-cache")},
              "onpolicy": {"rounds": 0}, "max_steps": 2, "valid_every": 2, "progress": False,
              "engine": {"zero_stage": 0}, "data": {"max_atoms": 16, "valid_fraction": 0.2},
              "report": {"speed_steps": 2, "speed_repeats": 1, "nve_steps": 2}}
    out = run_recipe(work, "distill", values)
    report = json.loads((work / "distilled" / "report.json").read_text())
    assert report["vs_reference"]["teacher"]["forces_mae"] > 0     # the imported model labelled, not EMT
    student = FoundationModel.from_pretrained(out)
    assert set(student.config.elements) == {"Cu", "Au"}
    assert student.hub_metadata.get("license") == LICENSE


@pytest.mark.slow
def test_push_then_md_from_the_repo_id(work, tmp_path):
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "test-token",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    write(tmp_path / "cell.extxyz", cuau_frames(1, 5)[0])
    foundation = [sys.executable, "-m", "foundation.cli"]
    try:
        push = subprocess.run([*foundation, "push", str(work / "imported"), "org/mace-cuau"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr[-3000:]
        md = subprocess.run([*foundation, "md", "org/mace-cuau", str(tmp_path / "cell.extxyz"), "--steps", "4",
                             "--temperature", "300"], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert md.returncode == 0, md.stderr[-3000:]
    assert (tmp_path / "cell.md.log").read_text().count("\n") >= 2
    blobs = (tmp_path / "hub" / "org" / "mace-cuau" / "blobs").iterdir()   # the pushed card is one of them
    assert any(f"license: {LICENSE}".encode() in p.read_bytes() for p in blobs)
