"""One run per out_dir: a fresh run over an earlier run's checkpoints is refused (--resume / --overwrite), and a
second run into a busy out_dir fails at once naming the PID of the first, whose lock dies with it (SIGKILL)."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

RUNNER = Path(__file__).resolve().parent / "run_pair.py"
LOCK_NAME = ".foundation.lock"   # foundation.train.outdir.LOCK_NAME (spelt out: the test must run on old code)


def pair_recipe(tmp: Path, out: Path, emt_data, steps: int = 4, **top) -> Path:
    values = {"out_dir": str(out), "max_steps": steps, "log_every": 1, "valid_every": 2, "checkpoint_every": 2,
              "keep_checkpoints": 2, "progress": False, "seed": 3,
              "data": {"train": [str(emt_data["train"])], "valid": [str(emt_data["valid"])], "max_atoms": 48},
              "optim": {"lr": 0.02}, "engine": {"gradient_accumulation": 1}, **top}
    path = tmp / f"{out.name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def child_env(delay: float = 0.0, **extra: str) -> dict:
    from foundation.train.engine import child_environment
    return child_environment(FOUNDATION_TEST_STEP_DELAY=str(delay), OMP_NUM_THREADS="1", **extra)


def logged_steps(out: Path) -> list[int]:
    try:
        with open(out / "train.csv", newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f)]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def pair_model():
    import torch
    from pair_model import PairPotential
    torch.manual_seed(0)
    return PairPotential([28, 29], r_max=4.0)


def config(out: Path, emt_data, steps: int):
    from foundation.train.config import load_config
    return load_config(pair_recipe(out.parent, out, emt_data, steps))


def test_fresh_run_over_checkpoints_is_refused_until_resume_or_overwrite(tmp_path, emt_data):
    from foundation.train.loop import run
    out = tmp_path / "run"
    run(config(out, emt_data, 4), model=pair_model())
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_00000004" in before
    with pytest.raises(ValueError, match=r"--resume.*--overwrite"):
        run(config(out, emt_data, 2), model=pair_model())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before   # nothing deleted
    with pytest.raises(ValueError, match="not both"):
        run(config(out, emt_data, 2), model=pair_model(), resume=True, overwrite=True)
    run(config(out, emt_data, 2), model=pair_model(), overwrite=True)
    assert not (out / "checkpoints" / "step_00000004").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert logged_steps(out) == [1, 2]


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "distill"])
def test_every_training_verb_refuses_an_out_dir_with_checkpoints(tmp_path, verb, capsys):
    from foundation.cli import main as cli
    repo = Path(__file__).resolve().parents[2]
    recipe = {"pretrain": "pretrain_small", "finetune": "finetune_mlearn_si", "distill": "distill_own_model"}[verb]
    out = tmp_path / "out"
    stage = out / ("train" if verb == "distill" else "") / "checkpoints" / "step_00000010"
    stage.mkdir(parents=True)
    code = cli([verb, str(repo / "recipes" / f"{recipe}.yaml"), "--set", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds checkpoints" in err and "--resume" in err and "--overwrite" in err, err
    assert stage.is_dir()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_second_run_names_the_pid_of_the_first_and_the_lock_dies_with_it(tmp_path, emt_data):
    out = tmp_path / "busy"
    recipe = pair_recipe(tmp_path, out, emt_data, steps=20)
    # 5 s per step: the first run is still training when the second has started up, however loaded the machine
    first = subprocess.Popen([sys.executable, str(RUNNER), str(recipe)], env=child_env(delay=5.0),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not logged_steps(out) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the test could start a second one"
    try:
        second = subprocess.run([sys.executable, str(RUNNER), str(recipe), "--resume"], env=child_env(),
                                capture_output=True, text=True, timeout=240)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode != 0
    assert f"PID {first.pid}" in second.stderr and "in use by another training run" in second.stderr, second.stderr
    assert (out / LOCK_NAME).read_text().strip() == str(first.pid)   # the file stays; its flock died with it
    third = subprocess.run([sys.executable, str(RUNNER), str(recipe), "--resume"], env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert logged_steps(out)[-1] == 20
