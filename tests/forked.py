"""Run a function in a forked child, for regressions where the old failure killed the process (SIGFPE).

A forked child inherits the test process's imports, so it starts in milliseconds instead of the seconds a fresh
``python -c`` spends importing torch, torch_geometric and foundation; a crash kills only the child.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable


def _child(fn: Callable[[], object], queue) -> None:
    queue.put(fn())


def run_forked(fn: Callable[[], object], timeout: float = 120.0) -> tuple[int, object]:
    """(exit code, return value of ``fn``) of ``fn()`` in a forked child; the value is None when the child died
    (exit code -8 is SIGFPE, -11 SIGSEGV) and ``fn`` must return something picklable."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(fn, queue))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        raise TimeoutError(f"{fn} did not finish in {timeout} s")
    return child.exitcode, (queue.get(timeout=5) if child.exitcode == 0 else None)
