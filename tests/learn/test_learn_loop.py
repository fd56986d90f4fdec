"""``foundation learn``: bad recipes fail before any MD, a failing labeller is recorded and the loop goes on, labels
are cached, and a run killed with SIGKILL resumes without calling the labeller again for labelled frames."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from learn_helpers import cuau, recipe, tiny_model

from foundation.learn.config import LearnConfig
from foundation.learn.explore import classify, pick

HERE = Path(__file__).resolve().parent


def config(tmp_path, **sections) -> LearnConfig:
    return LearnConfig.from_dict(recipe(tmp_path, **sections))


@pytest.mark.parametrize("sections, message", [
    ({"select": {"trust_lo": 0.3, "trust_hi": 0.3}}, "select.trust_lo"),
    ({"committee": {"size": 1}}, "committee of one model"),
    ({"base": {}}, "exactly one of base.model"),
    ({"labeller": {}}, "labeller"),
    ({"model": {"preset": "small"}}, "is not used by learn"),
])
def test_bad_recipes_are_refused(tmp_path, sections, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **sections)


def test_base_without_the_elements_fails_before_md(tmp_path, monkeypatch):
    from foundation.learn import run
    tiny_model(0, elements=("Cu", "Ni")).save_pretrained(tmp_path / "cuni")
    monkeypatch.setattr(run, "explore", lambda *a, **k: pytest.fail("MD ran"))
    monkeypatch.setattr(run, "test_set", lambda *a, **k: pytest.fail("labeller MD ran"))
    c = config(tmp_path, base={"model": str(tmp_path / "cuni")})
    with pytest.raises(ValueError, match=r"does not know elements \['Au'\]"):
        run.learn(c, log=lambda _: None)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    from foundation.learn.run import prepare_out_dir
    c = config(tmp_path)
    prepare_out_dir(c, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="--resume"):
        prepare_out_dir(c, resume=False, overwrite=False)
    prepare_out_dir(c, resume=True, overwrite=False)
    prepare_out_dir(c, resume=False, overwrite=True)


def test_failing_labeller_frames_are_recorded_and_cached(tmp_path, monkeypatch):
    from foundation.distill.teacher import load_teacher
    from foundation.learn.loop import label
    frames = [cuau(s, rattle=0.3) for s in range(6)]
    xs = sorted(float(a.positions[0, 0]) for a in frames)
    spec = {"calculator": "learn_helpers:FlakyEMT", "kwargs": {"raise_below": (xs[0] + xs[1]) / 2,
                                                               "nan_above": (xs[-2] + xs[-1]) / 2}}
    c = config(tmp_path, labeller=spec)
    teacher = load_teacher(c.labeller)
    got = label(c, teacher, frames, tmp_path / "labels", log=None)
    assert got["labelled"] == 4 and len(got["failed"]) == 2
    errors = " ".join(f["error"] for f in got["failed"])
    assert "SCF did not converge" in errors and "non-finite forces" in errors
    calls = []
    monkeypatch.setattr(type(teacher), "label", lambda *a, **k: calls.append(1) or pytest.fail("relabelled"))
    again = label(c, teacher, frames, tmp_path / "labels", log=None)
    assert again == got and not calls


def test_frames_read_back_from_extxyz_label(tmp_path):
    """Explored frames are stored as extxyz (info read back as numpy scalars) and labelled after a resume."""
    from foundation.distill.teacher import load_teacher
    from foundation.learn.loop import label, read_frames, write_frames
    frames = [cuau(s) for s in range(2)]
    for k, a in enumerate(frames):
        a.info.update(max_devi_f=0.1, run=0, md_step=5 * k, temperature_K=300.0)
    write_frames(tmp_path / "explore.extxyz", frames)
    back = read_frames(tmp_path / "explore.extxyz")
    assert [a.info["md_step"] for a in back] == [0, 5]
    c = config(tmp_path)
    got = label(c, load_teacher(c.labeller), back, tmp_path / "labels", log=None)
    assert got["labelled"] == 2 and not got["failed"]


def test_selection_window_and_diverse_pick():
    frames = [cuau(s) for s in range(12)]
    for a, d in zip(frames, np.linspace(0.0, 0.55, 12)):
        a.info["max_devi_f"] = float(d)
    groups = classify(frames, 0.1, 0.4)
    devi = np.array([a.info["max_devi_f"] for a in frames])
    assert np.all(devi[groups["accurate"]] < 0.1) and np.all(devi[groups["failed"]] >= 0.4)
    assert np.all((devi[groups["candidate"]] >= 0.1) & (devi[groups["candidate"]] < 0.4))
    assert sum(map(len, groups.values())) == 12
    for method in ("farthest", "time"):
        chosen = pick(frames, groups["candidate"], 3, method, 4.0)
        assert len(chosen) == 3 == len(set(chosen)) and set(chosen) <= set(groups["candidate"])
    far = pick(frames, groups["candidate"], 3, "farthest", 4.0)
    assert max(groups["candidate"], key=lambda i: devi[i]) in far   # starts at the largest deviation


def _start(tmp_path: Path, extra: list[str], log: Path) -> subprocess.Popen:
    from foundation.train.engine import LAUNCHER_VARIABLES
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}  # an earlier in-process test's
    # MASTER_PORT would be shared by the killed run and its resumption (EADDRINUSE while the first port lingers)
    env = {**inherited, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LEARN_TEST_LOG": str(log), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "foundation.cli", "learn", str(tmp_path / "r.yaml"), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_does_not_relabel(tmp_path):
    values = recipe(tmp_path, labeller={"calculator": "learn_helpers:LoggedEMT"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(values))
    run, log = tmp_path / "run", tmp_path / "calls.log"
    proc = _start(tmp_path, [], log)
    deadline = time.time() + 600
    while not (run / "iter-001" / "committee" / "member-0").exists():   # iteration 1's labels are written
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = log.read_text().split()
    labelled = json.loads((run / "iter-000" / "summary.json").read_text())["row"]["labels_added"]
    assert labelled == 2 and not (run / "learn_report.json").exists()
    proc = _start(tmp_path, ["--resume"], log)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    second = log.read_text().split()[len(first):]
    assert not set(first) & set(second), "the resumed run called the labeller on structures it had labelled"
    report = json.loads((run / "learn_report.json").read_text())
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["labels_added"] == 2
    assert rows[1]["explored"] == 4 and rows[1]["candidate"] == 4   # trust window (0, 1e9): every frame
    assert report["labels_total"] == 4 and (run / "learn_report.png").is_file()
    assert "test" in rows[1] and report["base_zero_shot"]["force_mae_meV_per_A"] > 0
    assert json.loads((run / "model" / "config.json").read_text())["model_info"]["class"] == "CommitteeModel"


def test_auto_trust_lo_is_the_quantile_of_the_committee_deviation_on_its_labelled_frames(tmp_path):
    """trust_lo: auto = the quantile of max_devi_f over the frames picked in earlier iterations, computed here
    independently from each member's forces; capped below trust_hi; a bad quantile is refused."""
    from foundation import FoundationCalculator
    from foundation.learn.committee import CommitteeModel
    from foundation.learn.loop import write_frames
    from foundation.learn.run import auto_trust_lo
    committee = CommitteeModel.from_members([tiny_model(s, dtype="float32") for s in range(3)])
    frames = [cuau(s, rattle=0.1 + 0.05 * s) for s in range(7)]
    write_frames(tmp_path / "iter-000" / "picked.extxyz", frames[:4])
    write_frames(tmp_path / "iter-001" / "picked.extxyz", frames[4:])
    devi = []
    for atoms in frames:
        forces = []
        for member in committee.members:
            a = atoms.copy()
            a.calc = FoundationCalculator(member, dtype="float32")
            forces.append(a.get_forces())
        forces = np.stack(forces)
        devi.append(np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0)).max())
    c = config(tmp_path, select={"trust_lo": "auto", "trust_lo_quantile": 0.75, "trust_hi": 1e9})
    got = auto_trust_lo(c, committee, tmp_path, 2)
    assert got == pytest.approx(float(np.quantile(devi, 0.75)), rel=1e-4)
    assert auto_trust_lo(c, committee, tmp_path, 1) == pytest.approx(float(np.quantile(devi[:4], 0.75)), rel=1e-4)
    low = config(tmp_path, select={"trust_lo": "auto", "trust_hi": 1e-6})
    assert auto_trust_lo(low, committee, tmp_path, 2) < 1e-6
    with pytest.raises(FileNotFoundError, match="picked.extxyz"):
        auto_trust_lo(c, committee, tmp_path, 3)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match="select.trust_lo_quantile"):
            config(tmp_path, select={"trust_lo": "auto", "trust_lo_quantile": q})
    with pytest.raises(ValueError, match="select.trust_lo"):
        config(tmp_path, select={"trust_lo": "often"})
