"""The build lock of DeepSpeed's just-in-time compiled ops: never wait on it forever.

DeepSpeed compiles its C++ ops with ``torch.utils.cpp_extension.load``, which takes a lock file
``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_cpu>/<op name>/lock`` for the build, even when the
op is already built, and waits without limit while the file exists. A process killed while holding it leaves
the file behind, and every later run waited forever with no output.

``wait_for_build_lock`` is called before DeepSpeed loads an op (``engine.py``). The process that holds the lock
keeps the file open for the whole build, so its owner is found among the processes of this machine
(``/proc/<pid>/fd``):

- nobody holds it (checked twice, ``STALE_AFTER`` seconds apart): the owner is gone; the file is removed and
  the run says so;
- a live process holds it: wait for it to finish, at most ``FOUNDATION_OP_BUILD_TIMEOUT`` seconds (default
  ``DEFAULT_TIMEOUT``), then a ``TimeoutError`` naming the lock file and the holder's PID.

Ops the run does not need are not loaded at all (``engine.init_distributed``), so a run with one rank never
meets this lock.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_TIMEOUT = 900.0   # s: a first build of an op takes 1-3 min on a busy machine
STALE_AFTER = 1.0         # s: an unheld lock must stay unheld this long (the owner closes it just before removal)


def build_lock(op_name: str) -> Path:
    """The lock file torch's JIT build of ``op_name`` takes (the same directory ``cpp_extension.load`` uses)."""
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(op_name, verbose=False)) / "lock"


def holders(path: Path) -> list[int]:
    """PIDs of the processes of this machine (readable by this user) that have ``path`` open."""
    target, pids = str(Path(path).resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:   # gone meanwhile, or another user's process
            continue
    return pids


def wait_for_build_lock(op_name: str, timeout: float | None = None, poll: float = 0.25,
                        log: Callable[[str], None] | None = print) -> None:
    """Return once the build lock of ``op_name`` is free (module doc): a stale lock is removed, a held one is
    waited for at most ``timeout`` seconds (default: ``FOUNDATION_OP_BUILD_TIMEOUT`` or ``DEFAULT_TIMEOUT``)."""
    path = build_lock(op_name)
    if timeout is None:
        timeout = float(os.environ.get("FOUNDATION_OP_BUILD_TIMEOUT", DEFAULT_TIMEOUT))
    start, unheld_since, pids = time.monotonic(), None, []
    while path.exists():
        now = time.monotonic()
        pids = holders(path)
        if pids:
            unheld_since = None
        elif unheld_since is None:
            unheld_since = now
        elif now - unheld_since >= STALE_AFTER:
            path.unlink(missing_ok=True)
            if log is not None:
                log(f"foundation: removed the stale build lock {path} of DeepSpeed op {op_name!r} (no process "
                    "holds it: a build was killed)")
            return
        if now - start > timeout:
            raise TimeoutError(f"DeepSpeed op {op_name!r}: waited {timeout:g} s for the build lock {path}, held by "
                               f"PID {pids or 'unknown'}; wait for that build to finish, or stop it and delete the "
                               "lock file (FOUNDATION_OP_BUILD_TIMEOUT sets the wait)")
        time.sleep(poll)
