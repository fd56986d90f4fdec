"""``foundation learn`` with ``replay:``: every member fine-tunes with strategy replay (a new head on the labels, the
base head on the base's own data), exploration, selection, the test metrics, the saved committee and the report
use the new head, and bad replay settings fail before any MD."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from learn_helpers import recipe, tiny_model

from foundation.learn.config import LearnConfig


def config(tmp_path, **sections) -> LearnConfig:
    return LearnConfig.from_dict(recipe(tmp_path, **sections))


@pytest.mark.parametrize("sections, message", [
    ({"replay": {}, "base": {"model": "base-dir"}}, "replay.data' is empty"),
    ({"replay": {"data": ["d"]}, "committee": {"size": 2, "head": "emt"}, "base": {"model": "b", "head": "emt"}},
     "is the base head"),
    ({"committee": {"size": 2, "head": "learn"}}, "without a replay: section"),
    ({"replay": {"weight": 1.0}}, "replay.weight"),
    ({"replay": {"samples": -1}}, "replay.samples"),
    ({"replay": {"bogus": 1}}, "unknown recipe key 'replay.bogus'"),
])
def test_bad_replay_recipes_are_refused(tmp_path, sections, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **sections)


def test_replay_defaults():
    from foundation.finetune.config import ReplaySection
    c = LearnConfig.from_dict(recipe(Path("/nonexistent"), replay={"samples": 10}))
    assert isinstance(c.replay, ReplaySection) and c.committee.head == "learn" == c.head
    assert LearnConfig.from_dict(recipe(Path("/nonexistent"))).head is None


@pytest.mark.parametrize("head, data, error, message", [
    ("default", "base", ValueError, "already a head of the base"),
    (None, "nowhere/base-data", FileNotFoundError, "nowhere/base-data"),
])
def test_replay_errors_come_before_md(tmp_path, monkeypatch, head, data, error, message):
    from foundation.learn import run
    tiny_model(0).save_pretrained(tmp_path / "base")   # heads ['default']
    monkeypatch.setattr(run, "explore", lambda *a, **k: pytest.fail("MD ran"))
    monkeypatch.setattr(run, "test_set", lambda *a, **k: pytest.fail("labeller MD ran"))
    c = config(tmp_path, replay={"data": [str(tmp_path / data)]}, base={"model": str(tmp_path / "base")},
               committee={"size": 2, "head": head})
    with pytest.raises(error, match=message):
        run.learn(c, log=lambda _: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny loop without and with replay (the base's own training data); a base trained long enough to
    predict forces, fine-tuned long enough to move away from it."""
    from foundation.learn.run import learn
    out = {}
    for name, extra in (("plain", {}), ("replay", {"replay": {"weight": 0.5}})):
        root = tmp_path_factory.mktemp(name)
        values = recipe(root, max_steps=12, **extra)
        values["base"]["build"].update(max_steps=40, rattle_copies=2)
        out[name] = (root / "run", learn(LearnConfig.from_dict(values), log=lambda _: None))
    return out


def _members(run: Path, iteration: int = 1) -> list:
    from foundation.model import FoundationModel
    return [FoundationModel.from_pretrained(p / "model")
            for p in sorted((run / f"iter-{iteration:03d}" / "committee").glob("member-*"))]


def _base_head_forces(model, frames, head: str) -> np.ndarray:
    from foundation.calculator import FoundationCalculator
    calc = FoundationCalculator(model, head=head, dtype="float64")
    return np.concatenate([r["forces"] for r in calc.calculate_many(frames, max_atoms=256)])


def test_replay_members_have_both_heads_and_the_report_says_so(runs):
    run, report = runs["replay"]
    assert report["head"] == "learn" and runs["plain"][1]["head"] == "default"
    base_data = report["replay"]["data"]
    assert len(base_data) == 1 and Path(base_data[0]).parent == run / "labels"   # the built base's own data
    for member in _members(run):
        assert member.config.heads == ["learn", "default"]
    saved = json.loads((run / "model" / "config.json").read_text())["model_config"]
    assert saved["heads"] == ["learn", "default"]
    assert "replay sample" in (run / "model" / "README.md").read_text()
    assert [m.config.heads for m in _members(runs["plain"][0])] == [["default"]] * 2


def _dataset_frames(path: str) -> list:
    """The structures of a dataset directory as ASE Atoms (positions, cell, pbc)."""
    from ase import Atoms

    from foundation import keys
    from foundation.data import ShardedDataset
    ds = ShardedDataset(path)
    out = []
    for i in range(len(ds)):
        rec = ds.record(i)
        atoms = Atoms(numbers=rec[keys.ATOMIC_NUMBERS].astype(int), positions=rec[keys.POSITIONS],
                      cell=rec[keys.CELL].reshape(3, 3), pbc=rec[keys.PBC].reshape(3))
        atoms.arrays["true_forces"] = np.asarray(rec[keys.FORCES], np.float64).reshape(-1, 3)
        out.append(atoms)
    return out


def test_base_head_keeps_the_base_data_with_replay(runs):
    """On the base's own training structures (the replay data), the members' base head fits the EMT forces
    better with replay than the in-place fine-tune without replay and than the base itself, and its readout was
    trained (a replay silently ignored fails here)."""
    from foundation.model import FoundationModel
    run, report = runs["replay"]
    frames = _dataset_frames(report["replay"]["data"][0])
    true = np.concatenate([a.arrays["true_forces"] for a in frames])
    base = FoundationModel.from_pretrained(run / "base" / "model")
    base_error = np.abs(_base_head_forces(base, frames, "default") - true).mean()
    error = {name: np.mean([np.abs(_base_head_forces(m, frames, "default") - true).mean() for m in _members(r)])
             for name, (r, _) in runs.items()}   # eV/Å, mean over the members
    assert error["replay"] < 0.9 * min(error["plain"], base_error), (error, base_error)
    weights, before = _members(run)[0].state_dict(), base.state_dict()
    k = _members(run)[0].config.head_index("default")   # the base head's readout rows: trained on the replay data
    assert not torch.allclose(weights["readouts.1.weight_out"][k], before["readouts.1.weight_out"][0])


def test_exploration_and_test_metrics_use_the_new_head(runs):
    from foundation.calculator import FoundationCalculator
    from foundation.learn.committee import CommitteeModel
    from foundation.learn.loop import read_frames, test_metrics
    run, report = runs["replay"]
    committee = CommitteeModel.from_pretrained(run / "iter-000" / "committee" / "model")
    frames = read_frames(run / "iter-001" / "explore.extxyz")
    stored = np.array([a.info["max_devi_f"] for a in frames])

    def devi(head):
        calc = FoundationCalculator(committee, head=head, dtype="float32")
        return np.array([r["max_devi_f"] for r in calc.calculate_many(frames, max_atoms=256)])
    assert np.allclose(devi("learn"), stored, rtol=1e-3, atol=1e-5)
    assert not np.allclose(devi("default"), stored, rtol=1e-2, atol=1e-3)
    final = CommitteeModel.from_pretrained(run / "iter-001" / "committee" / "model")
    test = read_frames(run / "test.extxyz")
    row = report["iterations"][-1]["test"]
    assert test_metrics(final, test, head="learn")["force_mae_meV_per_A"] == pytest.approx(row["force_mae_meV_per_A"])
    assert test_metrics(final, test, head="default")["force_mae_meV_per_A"] != pytest.approx(
        row["force_mae_meV_per_A"], rel=1e-3)
