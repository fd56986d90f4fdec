"""Exact resume: a run killed with SIGKILL at an arbitrary step and resumed logs the same losses, bit for bit
(1 rank, fp32, CPU), as the uninterrupted run; checkpoints stay loadable whatever the moment of the kill."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

RUNNER = Path(__file__).resolve().parent / "run_pair.py"
STEPS = 12


def recipe(tmp: Path, out: Path, emt_data, **engine) -> Path:
    values = {"out_dir": str(out), "max_steps": STEPS, "log_every": 1, "valid_every": 5, "checkpoint_every": 2,
              "keep_checkpoints": 2, "progress": False, "seed": 3,
              "data": {"train": [str(emt_data["train"]), str(emt_data["train_nostress"])],
                       "valid": [str(emt_data["valid"])], "max_atoms": 30},
              "loss": {"coefficients": {"energy": 1.0, "forces": 10.0, "stress": 10.0},
                       "schedule": [{"start": 0.5, "coefficients": {"energy": 20.0}}]},
              "optim": {"lr": 0.02, "grad_clip": 1.0}, "schedule": {"warmup_steps": 2},
              "engine": {"gradient_accumulation": 2, **engine}, "ema": {"decay": 0.9}}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def env(delay: float = 0.0) -> dict:
    e = dict(os.environ, FOUNDATION_TEST_STEP_DELAY=str(delay), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    return e


def train_rows(out: Path) -> list[dict]:
    with open(out / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_logged_step(out: Path) -> int:
    try:
        rows = train_rows(out)
    except (FileNotFoundError, ValueError):
        return 0
    return int(rows[-1]["step"]) if rows else 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_and_resume_logs_identical_losses(tmp_path, emt_data):
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(RUNNER), str(recipe(tmp_path, full, emt_data))], env=env(), check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    cfg = recipe(tmp_path, killed, emt_data)
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(cfg)], env=env(delay=0.15),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while last_logged_step(killed) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_logged_step(killed)
    assert 5 <= killed_at < STEPS, f"the run was not killed mid-way (last logged step {killed_at})"
    subprocess.run([sys.executable, str(RUNNER), str(cfg), "--resume"], env=env(), check=True,
                   capture_output=True, timeout=300)
    a, b = train_rows(full), train_rows(killed)
    assert [int(r["step"]) for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_energy", "loss_forces", "loss_stress", "lr", "grad_norm", "atoms"):
            assert ra[key] == rb[key], f"step {ra['step']}: {key} {ra[key]} != {rb[key]}"
    assert (full / "valid.csv").read_text() == (killed / "valid.csv").read_text()
