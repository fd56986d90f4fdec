"""Where convert writes (issue 18 items 3 and 7): nothing deleted that convert did not write, inputs inside --out
refused, temporary folders of a SIGKILLed conversion removed by the next one, a running conversion's kept."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
from data_helpers import emt_frames

from foundation.cli import main
from foundation.data.convert import convert
from foundation.data.manifest import read_manifest
from foundation.data.outdir import clean_orphans, host_tag

# a conversion that announces its temporary folder and then writes slowly (or waits for a release file)
_SLOW = """
import sys, time
from pathlib import Path
import foundation.data.convert as conv
real = conv.ShardWriter.append
def slow(self, fields):
    Path(sys.argv[3]).write_text(str(self.path.parent))
    while Path(sys.argv[4]).exists() is False and sys.argv[4] != "-":
        time.sleep(0.05)
    time.sleep(0.2 if sys.argv[4] == "-" else 0)
    return real(self, fields)
conv.ShardWriter.append = slow
conv.convert([sys.argv[1]], sys.argv[2], shard_size=2, progress=False)
"""


def _xyz(tmp_path, n=6, seed=0, name="in.xyz"):
    path = tmp_path / name
    ase.io.write(path, emt_frames(n, seed=seed), format="extxyz")
    return path


def _start_slow(tmp_path, source, out, release="-"):
    flag = tmp_path / f"tmpdir-{time.monotonic_ns()}.txt"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, str(source), str(out), str(flag), str(release)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the slow conversion did not start writing"
        time.sleep(0.05)
    return proc, Path(flag.read_text())


def test_input_inside_out_is_refused_and_kept(tmp_path, capsys):
    """Regression: `convert ds/x.extxyz --out ds` deleted the input with the previous dataset."""
    out = convert([_xyz(tmp_path)], tmp_path / "ds", progress=False)
    inside = out / "x.extxyz"
    ase.io.write(inside, emt_frames(3, seed=1), format="extxyz")
    before = inside.read_bytes()
    assert main(["data", "convert", str(inside), "--out", str(out)]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert inside.read_bytes() == before and read_manifest(out)["num_structures"] == 6


def test_files_convert_did_not_write_are_never_deleted(tmp_path):
    out = convert([_xyz(tmp_path)], tmp_path / "ds", progress=False)
    (out / "notes.txt").write_text("mine")
    try:
        convert([_xyz(tmp_path, seed=2, name="other.xyz")], out, progress=False)
        raise AssertionError("replacing a dataset folder holding a foreign file must be refused")
    except ValueError as exc:
        assert "notes.txt" in str(exc) and "did not write" in str(exc)
    assert (out / "notes.txt").read_text() == "mine"
    os.remove(out / "notes.txt")  # only convert's files left: replaced, and nothing of the old one remains
    convert([tmp_path / "other.xyz"], out, skip_invalid=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(read_manifest(out)["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.xyz", "other.xyz"]


def test_sigkilled_conversion_leaves_a_folder_the_next_run_removes(tmp_path):
    """Regression: out.tmp-* folders of a killed convert stayed forever, even after a successful re-run."""
    source = _xyz(tmp_path, n=8)
    proc, tmp = _start_slow(tmp_path, source, tmp_path / "ds")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert tmp.is_dir() and tmp.name.startswith("ds.tmp-")
    out = convert([source], tmp_path / "ds", progress=False)
    assert not tmp.exists() and read_manifest(out)["num_structures"] == 8
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_running_conversions_folder_is_kept(tmp_path):
    source = _xyz(tmp_path, n=4)
    release = tmp_path / "release"
    proc, tmp = _start_slow(tmp_path, source, tmp_path / "ds", release=release)
    try:
        convert([source], tmp_path / "ds", shard_size=3, progress=False)  # another conversion into the same out
        assert tmp.is_dir()
        assert clean_orphans(tmp_path / "ds") == [] and tmp.is_dir()
    finally:
        release.write_text("go")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not tmp.exists() and read_manifest(tmp_path / "ds")["num_structures"] == 4


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dataset_moved_away_by_a_killed_conversion_is_restored(tmp_path):
    out = convert([_xyz(tmp_path)], tmp_path / "ds", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    old = tmp_path / f"ds.old-{host_tag()}-{_dead_pid()}-1-dead"
    os.rename(out, old)  # killed between moving the old dataset away and renaming the new one in
    assert clean_orphans(out) and json.loads((out / "manifest.json").read_text()) == manifest
    assert not old.exists()
    # a stale .old folder beside a newer dataset is deleted (only the files its manifest lists)
    convert([_xyz(tmp_path, seed=3, name="b.xyz")], tmp_path / "b", progress=False)
    os.rename(tmp_path / "b", tmp_path / f"ds.old-{host_tag()}-{_dead_pid()}-1-gone")
    clean_orphans(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.xyz", "ds", "in.xyz"]
