"""DeepSpeed's JIT build lock left by a SIGKILLed process no longer hangs later runs: a one-rank run does not load
the op at all; where the op is loaded (several ranks) a stale lock is removed and a held one is waited for with a
limit, then named. Every child runs under a timeout, so a regression fails instead of hanging."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_outdir import RUNNER, child_env, logged_steps, pair_recipe

OP = "deepspeed_shm_comm"
HOLD = ("import os, sys, time\nos.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)   # what torch's FileBaton does while it builds\n"
        "print('holding', flush=True)\ntime.sleep(600)\n")
# init_distributed as rank 0 of 2: DeepSpeed loads the op before it waits for rank 1 (which never comes)
TWO_RANKS = "from foundation.train.engine import init_distributed\ninit_distributed()\n"


def hold_lock(lock: Path) -> subprocess.Popen:
    """A process that takes the build lock as torch does and keeps it (until the test kills it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def stale_lock(ext: Path) -> Path:
    """A lock left behind by a build killed with SIGKILL."""
    lock = ext / OP / "lock"
    holder = hold_lock(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists()
    return lock


def rank0_of_two(ext: Path, timeout: str = "900") -> subprocess.Popen:
    from foundation.train.engine import _free_port
    env = child_env(TORCH_EXTENSIONS_DIR=str(ext), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu",
                    FOUNDATION_OP_BUILD_TIMEOUT=timeout)
    return subprocess.Popen([sys.executable, "-c", TWO_RANKS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and what it started (a compiler it runs for the op build must not outlive the test)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
def test_one_rank_run_ignores_a_stale_build_lock(tmp_path, emt_data):
    ext = tmp_path / "ext"
    lock = stale_lock(ext)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(RUNNER), str(pair_recipe(tmp_path, out, emt_data, steps=2))],
                         env=child_env(TORCH_EXTENSIONS_DIR=str(ext)), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert logged_steps(out) == [1, 2]
    assert lock.exists() and sorted(p.name for p in lock.parent.iterdir()) == ["lock"]   # the op was not loaded


@pytest.mark.slow
def test_where_the_op_is_loaded_a_stale_lock_is_removed(tmp_path):
    ext = tmp_path / "ext"
    lock = stale_lock(ext)
    proc = rank0_of_two(ext)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while not any("removed the stale build lock" in line for line in lines) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-2000:]   # still going: building, or waiting for rank 1
    finally:
        kill_group(proc)
        reader.join(10)
    assert any(f"removed the stale build lock {lock}" in line for line in lines), lines


@pytest.mark.slow
def test_where_the_op_is_loaded_a_held_lock_is_named_after_a_bounded_wait(tmp_path):
    ext = tmp_path / "ext"
    lock = ext / OP / "lock"
    holder = hold_lock(lock)
    try:
        proc = rank0_of_two(ext, timeout="3")
        try:
            _, err = proc.communicate(timeout=240)
        finally:
            kill_group(proc)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0
    assert "TimeoutError" in err and str(lock) in err and f"PID [{holder.pid}]" in err, err[-2000:]
