"""One training run per ``out_dir``, and no fresh run over an earlier run's checkpoints.

``claim(out_dir, rank, resume, overwrite)`` is called by every training verb (pretrain, finetune, distill)
before it writes anything into ``out_dir``:

- rank 0 takes an exclusive ``flock`` on ``out_dir/.foundation.lock`` and writes its PID into it. The kernel
  drops the lock when the process dies, however it dies (SIGKILL included), so the lock cannot go stale. A second
  run into the same ``out_dir`` fails at once with an error naming the PID that holds it.
- ``out_dir`` holding checkpoints (``checkpoints/`` of the run, or of a distillation stage) is refused unless
  ``resume`` (continue from them) or ``overwrite`` (delete them and the exported ``model/``, then start afresh).

Claims nest within one process (fine-tuning claims ``out_dir`` before its ``Trainer`` does): a count per
directory, the lock released when the last claim is released.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

LOCK_NAME = ".foundation.lock"
_held: dict[str, list] = {}   # resolved out_dir -> [file descriptor, number of claims]


class OutDirError(ValueError):
    """``out_dir`` is in use by another run, or holds checkpoints the run was not told what to do with."""


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The ``checkpoints`` folders with at least one checkpoint under ``out_dir`` (its own, and those of
    sub-runs one level down such as distillation stages)."""
    out = Path(out_dir)
    found = []
    for folder in [out / "checkpoints", *sorted(out.glob("*/checkpoints"))]:
        if folder.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in folder.iterdir()):
            found.append(folder)
    return found


def _lock(out: Path) -> int:
    """Take the exclusive lock of ``out`` (rank 0); an ``OutDirError`` naming the holder's PID when it is taken."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutDirError(f"{out} is in use by another training run (PID {holder} holds {path}); wait for it to "
                          "finish or stop it, or give this run another out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim(out_dir, rank: int = 0, resume: bool = False, overwrite: bool = False, verb: str = "pretrain") -> Path:
    """Claim ``out_dir`` for this run (see the module doc); returns it as a Path. Release with ``release``."""
    out = Path(out_dir)
    if resume and overwrite:
        raise OutDirError(f"{verb}: give --resume (continue the run in {out}) or --overwrite (start it again), "
                          "not both")
    key = str(out.resolve())
    if rank == 0:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_lock(out), 1]
    try:
        found = checkpoint_dirs(out)
        if found and not (resume or overwrite):
            raise OutDirError(f"{out} holds checkpoints of an earlier run ({', '.join(map(str, found))}); continue "
                              f"it with 'foundation {verb} ... --resume', or start over with --overwrite (deletes "
                              "those checkpoints and the exported model), or choose another out_dir")
        if found and overwrite and rank == 0:
            for folder in found + [out / "model"]:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"foundation {verb}: --overwrite: removed the earlier run's checkpoints in {out}", flush=True)
    except BaseException:
        release(out, rank)
        raise
    return out


def release(out_dir, rank: int = 0) -> None:
    """Undo one ``claim``; the lock is dropped with the last one."""
    key = str(Path(out_dir).resolve())
    if rank != 0 or key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] <= 0:
        fd = _held.pop(key)[0]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
