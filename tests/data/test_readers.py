"""Streaming readers: extxyz frame by frame, ASE db, fairchem .aselmdb, anything else ASE reads."""
import ase.io
import numpy as np
import pytest
from ase.db import connect
from data_helpers import emt_frames

from foundation import keys
from foundation.data.labels import read_labels
from foundation.data.readers import iter_structures, read_atoms


def _same(a, b):
    assert a.get_chemical_formula() == b.get_chemical_formula()
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.cell.array, b.cell.array)
    la, lb = read_labels(a), read_labels(b)
    assert set(la) == set(lb)
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k])


def test_extxyz_frames_equal_ase(emt_xyz):
    path, frames = emt_xyz
    got = list(iter_structures(path))
    assert [i for i, _ in got] == list(range(len(frames)))
    for (_, a), b in zip(got, frames):
        _same(a, b)


def test_bad_extxyz_frames_are_reported_and_reading_goes_on(tmp_path, emt_xyz):
    path, frames = emt_xyz
    lines = path.read_text().splitlines(keepends=True)
    n0 = len(frames[0])
    frame0 = lines[: n0 + 2]
    bad = list(frame0)
    bad[2] = "Xx" + bad[2][2:]  # unknown element symbol
    text = "".join(frame0 + bad + frame0 + frame0[: n0])  # last frame truncated
    (tmp_path / "bad.xyz").write_text(text)
    got = list(iter_structures(tmp_path / "bad.xyz"))
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert isinstance(got[1][1], ValueError) and "Xx" in str(got[1][1])
    assert not isinstance(got[2][1], Exception)
    assert isinstance(got[3][1], ValueError) and "truncated" in str(got[3][1])


def test_garbage_count_line_is_a_file_error(tmp_path):
    (tmp_path / "g.xyz").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"g\.xyz, line 1"):
        list(iter_structures(tmp_path / "g.xyz"))


@pytest.mark.parametrize("suffix", [".db", ".aselmdb"])
def test_ase_databases(tmp_path, suffix):
    frames = emt_frames(5, seed=1)
    path = tmp_path / f"frames{suffix}"
    db = connect(str(path), use_lock_file=False)
    for k, atoms in enumerate(frames):
        db.write(atoms, key_value_pairs={"dft_energy": 10.0 + k}, data={"ref_forces": np.full((len(atoms), 3), k)})
    del db
    got = list(iter_structures(path))
    assert len(got) == 5
    for (i, a), b in zip(got, frames):
        _same(a, b)
        assert a.info["dft_energy"] == 10.0 + i
        labels = read_labels(a, {keys.ENERGY: "dft_energy", keys.FORCES: "ref_forces"})
        assert labels[keys.ENERGY] == 10.0 + i and np.all(labels[keys.FORCES] == i)


def test_other_ase_formats_via_iread(tmp_path):
    frames = emt_frames(4, seed=2)
    ase.io.write(tmp_path / "t.traj", frames)
    got = list(iter_structures(tmp_path / "t.traj"))
    assert len(got) == 4
    for (_, a), b in zip(got, frames):
        _same(a, b)


def test_missing_input():
    with pytest.raises(FileNotFoundError, match="nope.xyz"):
        list(iter_structures("nope.xyz"))


def test_vasp_outcar(tmp_path):
    import shutil
    from pathlib import Path

    import ase
    sample = Path(ase.__file__).parent / "test" / "testdata" / "vasp" / "OUTCAR_example_1"
    if not sample.is_file():
        pytest.skip("ASE's bundled OUTCAR sample is not installed")
    shutil.copy(sample, tmp_path / "OUTCAR")
    got = list(iter_structures(tmp_path / "OUTCAR"))
    ref = ase.io.read(sample, ":", format="vasp-out")
    assert len(got) == len(ref) >= 1
    for (_, a), b in zip(got, ref):
        _same(a, b)
        assert set(read_labels(a)) >= {keys.ENERGY, keys.FORCES, keys.STRESS}


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_extxyz_is_streamed_frame_by_frame(tmp_path, emt_xyz, suffix):
    import bz2
    import gzip
    import lzma
    path, frames = emt_xyz
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    lines[2] = "Zz" + lines[2][2:]  # first frame broken: reported, the rest still read
    with opener(tmp_path / f"f.xyz{suffix}", "wt") as fh:
        fh.write("".join(lines))
    got = list(iter_structures(tmp_path / f"f.xyz{suffix}"))
    assert len(got) == len(frames) and isinstance(got[0][1], ValueError) and "Zz" in str(got[0][1])
    for (_, a), b in zip(got[1:], frames[1:]):
        _same(a, b)


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".bz2"])
def test_read_atoms_is_ase_read_as_a_list_also_compressed(emt_xyz, tmp_path, suffix):
    """read_atoms decompresses .gz/.xz/.bz2 once (ASE's own read seeks inside the compressed stream, quadratic in
    the file's length) and selects with ASE's index syntax; an int index gives a list of one."""
    import bz2
    import gzip
    import lzma
    path, frames = emt_xyz
    opener = {"": open, ".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}[suffix]
    target = tmp_path / f"frames.xyz{suffix}"
    with opener(target, "wb") as fh:
        fh.write(path.read_bytes())
    for index, want in ((":", frames), ("1:20:4", frames[1:20:4]), (-1, frames[-1:]), ("::-7", frames[::-7])):
        got = read_atoms(target, index)
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want):
            _same(a, b)
    with pytest.raises(FileNotFoundError, match="missing.xyz.xz"):
        read_atoms(tmp_path / "missing.xyz.xz")
