"""Where ``foundation data convert`` writes: temporary folders named after their writer, removal of those a killed
conversion left behind, and replacement of exactly what a previous conversion wrote.

A conversion into ``out`` writes into ``<out>.tmp-<host>-<pid>-<start>-<random>`` beside it (``host``: 8 hex digits
of the host name's SHA-256, ``pid`` and ``start`` (the process start time in clock ticks from /proc) of the
writer), so the name alone says who writes there, from the moment the folder exists. A later conversion into the
same ``out`` removes such folders whose writer is gone (no process with that PID, or one started at another time);
it never touches a running conversion's folder, nor one written from another host. The previous dataset is moved
to ``<out>.old-<same tags>`` while the new one is renamed in; a kill in between leaves ``out`` absent and the old
folder behind, which the next conversion renames back (or deletes once a newer ``out`` is in place).

An existing ``out`` is replaced only when it holds nothing but the files its ``manifest.json`` lists as written by
``convert`` (``files``; older manifests: shards, ``manifest.json``, ``skipped.json``); anything else there, and any
input file inside ``out``, is a ``ValueError`` before anything is written or deleted.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .manifest import MANIFEST_NAME, fsync_dir, read_manifest

SKIPPED_NAME = "skipped.json"
_TAGGED = re.compile(r"^(?P<out>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[^-]+$")


def host_tag() -> str:
    """8 hex digits identifying this host (SHA-256 of its name)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def process_start(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22); 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def _tag() -> str:
    return f"{host_tag()}-{os.getpid()}-{process_start(os.getpid())}-"


def make_temp_dir(out: Path) -> Path:
    """A new empty ``<out>.tmp-<host>-<pid>-<start>-XXXX`` beside ``out`` with the permissions of a new folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{_tag()}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def old_dir_name(out: Path) -> Path:
    """Where the previous dataset waits while the new one is renamed in (tagged like the temporary folder)."""
    return out.parent / f"{out.name}.old-{_tag()}{os.urandom(4).hex()}"


def writer_alive(host: str, pid: int, start: int) -> bool:
    """False only when the writer is certainly gone: this host, and no process ``pid`` started at ``start``."""
    if host != host_tag():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return not (start and now and now != start)


def clean_orphans(out: Path) -> list[str]:
    """Remove the temporary folders of dead conversions into ``out``; restore or delete their ``.old`` folders.

    Returns one line per action taken (for the progress output)."""
    done = []
    if not out.parent.is_dir():
        return done
    for path in sorted(out.parent.iterdir()):
        m = _TAGGED.match(path.name)
        if not m or m["out"] != out.name or not path.is_dir():
            continue
        if writer_alive(m["host"], int(m["pid"]), int(m["start"])):
            continue
        if m["kind"] == "tmp":
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by a conversion (PID {m['pid']}) that no longer runs")
        elif not out.exists():
            os.rename(path, out)
            fsync_dir(out.parent)
            done.append(f"restored {out} from {path.name}, left by a conversion killed while replacing it")
        else:
            remove_written(path)
            done.append(f"removed {path.name}, the dataset a finished conversion replaced")
    return done


def written_files(directory: Path) -> list[str]:
    """Names of the files a conversion wrote into ``directory``, as its manifest lists them."""
    manifest = read_manifest(directory)
    if "files" in manifest:
        return list(manifest["files"])
    names = [s["file"] for s in manifest["shards"]] + [MANIFEST_NAME]
    return names + ([SKIPPED_NAME] if (directory / SKIPPED_NAME).is_file() else [])


def check_inputs_outside(out: Path, inputs: list[Path]) -> None:
    """``ValueError`` if an input file lies inside ``out`` (replacing ``out`` would delete it)."""
    target = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(target):
            raise ValueError(f"input {p} lies inside --out {out}; converting would replace the folder holding it: "
                             f"choose an --out outside the inputs' folder")


def check_replaceable(out: Path) -> None:
    """``ValueError`` unless ``out`` is absent, empty, or holds only what a conversion wrote (its manifest)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise ValueError(f"--out {out} exists, is not empty and is not a converted dataset (no {MANIFEST_NAME}); "
                         f"refusing to replace it: choose another path or remove it")
    try:
        owned = set(written_files(out))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--out {out}: its {MANIFEST_NAME} is unreadable ({exc}), so what convert wrote there is "
                         f"unknown; refusing to replace it: choose another path or remove it") from None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned or not p.is_file())
    if foreign:
        raise ValueError(f"--out {out} holds {len(foreign)} entries that `foundation data convert` did not write "
                         f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); refusing to replace it: "
                         f"move them elsewhere or choose another --out")


def remove_written(directory: Path) -> None:
    """Delete the files a conversion wrote into ``directory`` (its manifest lists them), then the folder if empty."""
    try:
        names = written_files(directory)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return
    for name in sorted(names, key=lambda n: n == MANIFEST_NAME):  # the manifest last: it lists the rest
        if "/" not in name and name not in ("", ".", ".."):
            (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass
