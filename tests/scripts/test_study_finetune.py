"""scripts/study_finetune.py: the tables print the right rows and changes, splits are checked, and the --quick
study runs end to end (tiny corpus generated from nothing, pretraining, every variant, JSON + PNG) with the
invariants that must hold whatever the sizes: every fine-tune starts from the same step-0 model, and the frozen
strategy with a new head leaves the pretraining head's predictions unchanged (no forgetting by construction)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_finetune.py"
PROPS = ("energy_per_atom", "forces", "stress")


@pytest.fixture(scope="module")
def study(load_script):
    return load_script(SCRIPT)


def _row(name, e, f, s, before=None, after=None):
    fg = None if before is None else {"before": dict(zip(PROPS, before)), "after": dict(zip(PROPS, after))}
    return {"variant": name, "steps": 300, "lr": 0.002, "cpu_s": 61.4, "test": dict(zip(PROPS, (e, f, s))),
            "forgetting": fg}


def test_tables(study):
    rows = [{"variant": "base (zero-shot)", "steps": 0, "test": dict(zip(PROPS, (0.02, 0.1766, None)))},
            _row("full", 0.0041, 0.0309, 0.0012, (0.05, 0.080, 0.010), (0.06, 0.1072, 0.010)),
            _row("replay", 0.0045, 0.0321, 0.0013, (0.05, 0.080, 0.010), (0.05, 0.0776, 0.011)),
            _row("scratch", 0.012, 0.0586, 0.003)]
    lines = study.format_test_table(rows).splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["base", "full", "replay", "scratch"]
    assert lines[1].split()[2:] == ["0", "-", "20.00", "176.6", "-", "-"]
    assert lines[2].split()[1:] == ["300", "0.0020", "4.10", "30.9", "1.20", "61"]
    forget = study.format_forgetting_table(rows).splitlines()
    assert [ln.split()[0] for ln in forget[1:]] == ["full", "replay"]      # rows without forgetting are left out
    assert forget[1].split()[1:] == ["50.00", "60.00", "+20.0%", "80.0", "107.2", "+34.0%", "10.00", "10.00",
                                     "+0.0%"]
    assert forget[2].split()[6] == "-3.0%"


def test_split_sizes_are_checked(study, tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.db import connect

    from foundation.data.convert import convert
    for part, n in (("metals", 6), ("heldout", 5)):
        with connect(tmp_path / f"{part}.db", use_lock_file=False) as db:
            for i in range(n):
                atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
                atoms.rattle(0.05, seed=i)
                atoms.calc = EMT()
                atoms.get_potential_energy()
                db.write(atoms)
        convert([tmp_path / f"{part}.db"], tmp_path / "corpus" / part, r_max=5.0, progress=False)
    args = Namespace(split_seed=0, frames=2, valid_frames=1, test_frames=2, metals_valid=2, with_molecules=False)
    splits = study.split_corpus(tmp_path / "corpus", tmp_path / "splits", args)
    assert splits["sizes"] == {"metals_valid": 2, "metals_train": 4, "cuau_train": 2, "cuau_valid": 1,
                               "cuau_test": 2}
    from foundation.data import ShardedDataset
    assert len(ShardedDataset(splits["paths"]["cuau_test"])) == 2
    assert study.split_corpus(tmp_path / "corpus", tmp_path / "splits", args) == splits   # reused as they are
    args.split_seed = 1
    with pytest.raises(ValueError, match="other settings"):
        study.split_corpus(tmp_path / "corpus", tmp_path / "splits", args)
    args.frames = 3
    with pytest.raises(ValueError, match="heldout has 5 structures"):
        study.split_corpus(tmp_path / "corpus", tmp_path / "splits2", args)
    with pytest.raises(FileNotFoundError, match="foundation data generate"):
        study.corpus(Namespace(data=str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    pytest.importorskip("tblite")   # the demo corpus labels its molecules with GFN2-xTB
    from foundation.train.engine import child_environment  # an earlier in-process run set them: start afresh
    env = child_environment()
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "study_finetune.json").read_text())
    assert (tmp_path / "finetune_curves.png").stat().st_size > 10_000
    names = [v["variant"] for v in result["variants"]]
    assert names == ["full", "frozen", "lora", "replay", "full_inplace", "scratch"]
    assert result["sizes"]["cuau_train"] == 8 and result["base"]["steps"] == 8
    for v in result["variants"]:
        assert all(math.isfinite(v["test"][k]) and v["test"][k] > 0 for k in PROPS), v
        assert v["curve"]["step"][-1] == 6 and len(v["curve"]["forces"]) == len(v["curve"]["step"])
        assert v["steps"] == 6 and v["cpu_s"] > 0
    tuned = [v for v in result["variants"] if not v["variant"].startswith("scratch")]
    # every fine-tune starts from the base with the same refitted E0: identical step-0 validation errors
    for k in PROPS:
        assert len({round(v["step0"][k], 12) for v in tuned}) == 1
    frozen = next(v for v in tuned if v["variant"] == "frozen")["forgetting"]
    for k in PROPS:   # backbone frozen, the new head trains: head 'emt' predicts what it did (fp32 round trip)
        assert frozen["after"][k] == pytest.approx(frozen["before"][k], rel=1e-5)
    full = next(v for v in tuned if v["variant"] == "full")
    assert full["trainable_parameters"] > next(v for v in tuned if v["variant"] == "lora")["trainable_parameters"]
    out = proc.stdout
    for name in names + ["base (zero-shot)"]:
        assert f"\n{name} " in out
    assert "forgetting: pretraining metals validation (10 structures, head emt)" in out
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--reuse",
                            "--variants", "replay,scratch"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replay: reused" in again.stdout and "scratch: reused" in again.stdout
    reused = json.loads((tmp_path / "study_finetune.json").read_text())
    assert [v["test"] for v in reused["variants"]] == [v["test"] for v in result["variants"][3:6:2]]
    assert reused["zero_shot"] == result["zero_shot"]
