"""Conversion: exact round trip, manifest contents, bad input, atomicity, idempotency, the CLI."""
import json
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect
from data_helpers import data_file, emt_frames

from foundation import keys
from foundation.cli import main
from foundation.data.convert import convert
from foundation.data.dataset import ShardedDataset
from foundation.data.labels import read_labels
from foundation.data.manifest import read_manifest, sha256_file
from foundation.data.readers import read_atoms


def assert_round_trip(out, frames):
    """Every record of the dataset equals the input frame bit for bit (structure and labels)."""
    ds = ShardedDataset(out)
    assert len(ds) == len(frames)
    np.testing.assert_array_equal(ds.natoms, [len(a) for a in frames])
    for i, atoms in enumerate(frames):
        rec = ds.record(i)
        np.testing.assert_array_equal(rec[keys.ATOMIC_NUMBERS], atoms.numbers)
        assert rec[keys.POSITIONS].tobytes() == np.ascontiguousarray(atoms.positions, np.float64).tobytes()
        assert rec[keys.CELL].tobytes() == atoms.cell.array.astype(np.float64).tobytes()
        np.testing.assert_array_equal(rec[keys.PBC], atoms.pbc)
        for name, value in read_labels(atoms).items():
            assert rec[name].tobytes() == value.tobytes(), (i, name)
    return ds


def test_generated_data_round_trips_exactly(tmp_path, emt_xyz):
    path, frames = emt_xyz
    out = convert([path], tmp_path / "ds", shard_size=7, progress=False, level_of_theory="EMT")
    assert_round_trip(out, frames)
    m = read_manifest(out)
    assert [s["count"] for s in m["shards"]] == [7, 7, 7, 7, 2]
    assert m["num_structures"] == 30 and m["num_atoms"] == sum(len(a) for a in frames)
    assert m["elements"] == ["Al", "Ni", "Cu"] and m["level_of_theory"] == "EMT"
    assert set(m["properties"]) == {"energy", "forces", "stress", "total_charge"}
    assert m["properties"]["forces"] == {"unit": "eV/Å", "per_atom": True, "count": 30}
    assert sorted(m["files"]) == sorted([s["file"] for s in m["shards"]] + ["manifest.json"])
    for s in m["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
    prov = m["provenance"]
    assert prov["inputs"][0]["sha256"] == sha256_file(path) and prov["arguments"]["shard_size"] == 7
    stats = m["statistics"]
    assert stats["r_max"] == 5.0 and stats["avg_num_neighbors"] > 10 and stats["force_rms"] > 0
    assert set(stats["reference_energies"]) == {"Al", "Ni", "Cu"} and stats["e0_rank"] == 3
    assert not list(tmp_path.glob("ds.tmp-*"))


def test_mlearn_si_round_trips(tmp_path):
    path = data_file("mlearn/Si_train.xyz.xz")
    out = convert([path], tmp_path / "si", shard_size=100, progress=False)
    assert_round_trip(out, read_atoms(path))
    m = read_manifest(out)
    assert m["num_structures"] == 214 and "stress" in m["properties"]


def test_rmd17_aspirin_round_trips(tmp_path):
    path = data_file("rmd17/rmd17_aspirin_train_01.xyz.xz")
    out = convert([path], tmp_path / "asp", shard_size=300, progress=False)
    assert_round_trip(out, read_atoms(path))
    m = read_manifest(out)
    assert m["num_structures"] == 1000 and set(m["properties"]) == {"energy", "forces", "total_charge"}
    assert m["statistics"]["e0_rank"] == 1  # one stoichiometry: the minimum-norm E0 is reported as such


def test_aselmdb_and_key_map(tmp_path):
    frames = emt_frames(6, seed=4)
    db = connect(str(tmp_path / "in.aselmdb"), use_lock_file=False)
    for k, atoms in enumerate(frames):
        db.write(atoms, key_value_pairs={"dft_e": -float(k)}, data={"q": np.linspace(-1, 1, len(atoms))})
    del db
    out = convert([tmp_path / "in.aselmdb"], tmp_path / "ds", key_map={"energy": "dft_e", "charges": "q"},
                  progress=False)
    ds = ShardedDataset(out)
    assert [float(ds.record(i)[keys.ENERGY]) for i in range(6)] == [-float(k) for k in range(6)]
    np.testing.assert_array_equal(ds.record(2)[keys.CHARGES], np.linspace(-1, 1, len(frames[2])))


def _write_with_bad(tmp_path, bad: Atoms, index=2):
    frames = emt_frames(5, seed=5)
    frames.insert(index, bad)
    path = tmp_path / "in.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def _labelled(atoms, energy=-1.0, forces=None, stress=True):
    f = np.zeros((len(atoms), 3)) if forces is None else forces
    kw = {"stress": np.zeros(6)} if stress else {}
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=f, **kw)
    return atoms


def _cell_atoms(symbols="Cu2", positions=((0, 0, 0), (1.8, 1.8, 0))):
    return Atoms(symbols, positions=positions, cell=np.eye(3) * 3.6, pbc=True)


BAD_CASES = {
    "nan": (lambda: _labelled(_cell_atoms(), energy=np.nan), "NaN or inf"),
    "inf_forces": (lambda: _labelled(_cell_atoms(), forces=np.full((2, 3), np.inf)), "NaN or inf"),
    "close": (lambda: _labelled(_cell_atoms(positions=((0, 0, 0), (0.05, 0, 0)))), "closer than 0.1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_stop_with_file_and_index_or_are_skipped(tmp_path, case):
    make, message = BAD_CASES[case]
    path = _write_with_bad(tmp_path, make())
    with pytest.raises(ValueError, match=rf"in\.xyz, record 2: .*{message}.*--skip-invalid"):
        convert([path], tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob("ds.tmp-*"))
    out = convert([path], tmp_path / "ds", skip_invalid=True, progress=False)
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["record"], message in s["reason"]) for s in skipped] == [(2, True)]
    assert read_manifest(out)["num_structures"] == 5 and read_manifest(out)["skipped"] == 1


def test_unknown_element_symbol(tmp_path):
    path = _write_with_bad(tmp_path, _labelled(_cell_atoms()), index=1)
    lines = path.read_text().splitlines(keepends=True)
    start = int(lines[0]) + 2
    lines[start + 2] = "Qq" + lines[start + 2][2:]
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"record 1: unknown element symbol 'Qq'"):
        convert([path], tmp_path / "ds", progress=False)
    out = convert([path], tmp_path / "ds", skip_invalid=True, progress=False)
    assert json.loads((out / "skipped.json").read_text())[0]["record"] == 1


def test_unknown_atomic_number_in_database(tmp_path):
    db = connect(str(tmp_path / "in.db"), use_lock_file=False)
    atoms = _labelled(_cell_atoms())
    db.write(atoms)
    bad = atoms.copy()
    bad.numbers[0] = 0  # 'X', not a chemical element
    db.write(bad)
    with pytest.raises(ValueError, match=r"in\.db, record 1: unknown element \(atomic number 0\)"):
        convert([tmp_path / "in.db"], tmp_path / "ds", progress=False)


def test_explicit_key_missing_everywhere(tmp_path, emt_xyz):
    with pytest.raises(ValueError, match=r"record 0: missing required label.*dft"):
        convert([emt_xyz[0]], tmp_path / "ds", key_map={"energy": "dft"}, progress=False)


def test_all_invalid_is_an_error_and_bad_arguments(tmp_path):
    path = tmp_path / "bad.xyz"
    ase.io.write(path, [_labelled(_cell_atoms(), energy=np.nan)])
    with pytest.raises(ValueError, match="no valid structures"):
        convert([path], tmp_path / "ds", skip_invalid=True, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        convert([tmp_path / "missing.xyz"], tmp_path / "ds", progress=False)
    with pytest.raises(ValueError, match="shard-size"):
        convert([path], tmp_path / "ds", shard_size=0, progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        convert([path], tmp_path / "precious", progress=False)


def test_failure_midway_leaves_nothing_and_keeps_old_dataset(tmp_path, emt_xyz, monkeypatch):
    import foundation.data.convert as conv
    path, frames = emt_xyz
    out = convert([path], tmp_path / "ds", shard_size=5, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = conv.ShardWriter.append

    def failing(self, fields):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full (simulated)")
        return real(self, fields)

    monkeypatch.setattr(conv.ShardWriter, "append", failing)
    with pytest.raises(ValueError, match=r"could not write into .*disk full \(simulated\).*Nothing was changed"):
        convert([path], out, shard_size=4, progress=False)  # different arguments: would replace
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_rerun_is_idempotent_and_replacing_is_safe(tmp_path, emt_xyz):
    path, frames = emt_xyz
    out = convert([path], tmp_path / "ds", shard_size=8, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    convert([path], out, shard_size=8, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # up to date: untouched
    shard_bytes = {p.name: p.read_bytes() for p in out.glob("*.lmdb")}
    manifest = read_manifest(out)
    (out / "shard-00001.lmdb").write_bytes(b"damaged")  # no longer up to date: rebuilt identically
    convert([path], out, shard_size=8, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.lmdb")} == shard_bytes
    again = read_manifest(out)
    again["provenance"].pop("created"), manifest["provenance"].pop("created")
    assert again == manifest
    convert([path], out, shard_size=11, progress=False)  # different arguments replace the dataset
    assert [s["count"] for s in read_manifest(out)["shards"]] == [11, 11, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert_round_trip(out, frames)


def test_cli_convert_and_inspect(tmp_path, emt_xyz, capsys):
    path, frames = emt_xyz
    out = tmp_path / "cli"
    assert main(["data", "convert", str(path), "--out", str(out), "--shard-size", "10",
                 "--dataset-name", "emt-demo", "--r-max", "4.0"]) == 0
    m = read_manifest(out)
    assert m["name"] == "emt-demo" and m["statistics"]["r_max"] == 4.0 and len(m["shards"]) == 3
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "emt-demo" in text and "verified: 3 shards, 30 records" in text and "Cu" in text
    assert main(["data", "convert", str(tmp_path / "nope.xyz"), "--out", str(out)]) == 2
    assert "nope.xyz" in capsys.readouterr().err
    os.remove(out / "manifest.json")
    assert main(["data", "inspect", str(out)]) == 2


@pytest.mark.parametrize("molecule_first", [True, False])
def test_stress_is_required_only_of_fully_periodic_structures(tmp_path, molecule_first):
    from ase.build import fcc111, molecule
    bulk_frames = emt_frames(3, seed=6)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)  # pbc = (T, T, F): no stress
    slab.info.clear()
    mol = molecule("H2O")
    others = [_labelled(slab, stress=False), _labelled(mol, stress=False)]
    frames = others + bulk_frames if molecule_first else bulk_frames + others
    ase.io.write(tmp_path / "mix.xyz", frames)
    out = convert([tmp_path / "mix.xyz"], tmp_path / "ds", progress=False)
    ds = ShardedDataset(out)
    has_stress = [keys.STRESS in ds.record(i) for i in range(len(frames))]
    assert has_stress == [bool(a.pbc.all()) for a in frames]
    assert "stress" in read_manifest(out)["properties"]
    assert_round_trip(out, ase.io.read(tmp_path / "mix.xyz", ":"))
    from foundation.data.inspect import inspect
    assert "verified: 1 shards, 5 records" in inspect(out, verify=True)
    # a fully periodic structure without stress, after one with it, is stored without it (counted in the manifest)
    ase.io.write(tmp_path / "more.xyz", frames + [_labelled(_cell_atoms(), stress=False)])
    out = convert([tmp_path / "more.xyz"], tmp_path / "ds2", progress=False)
    assert keys.STRESS not in ShardedDataset(out).record(5) and read_manifest(out)["properties"]["stress"]["count"] == 3
    # a label named with key_map stays required of every record
    with pytest.raises(ValueError, match=r"record 5: missing required label.*stress"):
        convert([tmp_path / "more.xyz"], tmp_path / "ds3", key_map={"stress": "stress"}, progress=False)


def test_a_label_missing_on_the_first_record_is_kept_for_the_others(tmp_path):
    """Regression (issue 18.4): energy missing on record 0 dropped energy for the whole dataset, silently."""
    frames = emt_frames(5, seed=7)
    first = frames[0]
    first.calc = SinglePointCalculator(first, forces=first.get_forces(), stress=first.get_stress())
    frames[3].info["dipole"] = [0.1, 0.2, 0.3]  # a label only one later record has is stored too
    ase.io.write(tmp_path / "in.xyz", frames)
    out = convert([tmp_path / "in.xyz"], tmp_path / "ds", progress=False)
    ds = ShardedDataset(out)
    assert keys.ENERGY not in ds.record(0)
    assert [float(ds.record(i)[keys.ENERGY]) for i in range(1, 5)] == [a.get_potential_energy() for a in frames[1:]]
    np.testing.assert_array_equal(ds.record(3)[keys.DIPOLE], [0.1, 0.2, 0.3])
    props = read_manifest(out)["properties"]
    assert {k: v["count"] for k, v in props.items()} == {"energy": 4, "forces": 5, "stress": 5, "dipole": 1,
                                                          "total_charge": 5}
    from foundation.data.inspect import inspect
    assert "verified: 1 shards, 5 records" in inspect(out, verify=True)


def _convert_far_apart(tmp_path) -> int:
    atoms = Atoms("H2", positions=[[0, 0, 0], [1e6, 0, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=[[0, 0, 0], [0, 0, 0]])
    ase.io.write(tmp_path / "far.xyz", [atoms])
    from foundation.cli import main
    return main(["data", "convert", str(tmp_path / "far.xyz"), "--out", str(tmp_path / "ds"), "--skip-invalid"])


def test_atoms_1e6_angstrom_apart_convert_instead_of_sigfpe(tmp_path):
    """Regression (issue 18.9): convert died with SIGFPE (exit 136 / -8), even with --skip-invalid."""
    from forked import run_forked
    code, status = run_forked(lambda: _convert_far_apart(tmp_path))
    assert (code, status) == (0, 0), f"convert killed its process (exit {code}) or failed ({status})"
    m = read_manifest(tmp_path / "ds")
    assert m["num_structures"] == 1 and m["statistics"]["avg_num_neighbors"] == 0


@pytest.mark.parametrize("cell, message", [([[3, 0, 0], [0, 3, 0], [3, 3, 0]], "coplanar or parallel"),
                                           ([[3, 0, 0], [0, 3, 0], [0, 0, 0]], "zero length")])
def test_a_degenerate_cell_is_one_line_naming_the_record(tmp_path, capsys, cell, message):
    """Regression (issue 18.12): a coplanar periodic cell gave a raw RuntimeError traceback from vesin."""
    bad = _labelled(Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 1.0]], cell=cell, pbc=True))
    path = _write_with_bad(tmp_path, bad, index=1)
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in.xyz, record 1:" in err and message in err and "--skip-invalid" in err


def test_disk_full_is_one_line_naming_the_folder(tmp_path, emt_xyz, monkeypatch, capsys):
    """Regression (issue 18.12): ENOSPC (here from writing the manifest to /dev/full) was a raw OSError."""
    import foundation.data.convert as conv
    real = conv.write_json_synced

    def to_dev_full(path, obj):
        return real("/dev/full", obj) if str(path).endswith("manifest.json") else real(path, obj)

    monkeypatch.setattr(conv, "write_json_synced", to_dev_full)
    assert main(["data", "convert", str(emt_xyz[0]), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the file system of" in err and "free space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _convert_capturing_stderr(source: Path, out: Path) -> tuple[int, str]:
    import contextlib
    import io

    from foundation.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["data", "convert", str(source), "--out", str(out)])
    return status, err.getvalue()


def test_a_full_file_system_is_one_line(tmp_path):
    """A real full disk: a 256 KiB tmpfs, where LMDB reports "Input/output error" (skipped where mount is denied).
    ~1 MB of records (400 frames of 32 atoms); the conversion runs in a forked child, which a full disk can kill."""
    import subprocess

    from forked import run_forked
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(400):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(32, 3)))
        frames.append(atoms)
    ase.io.write(tmp_path / "big.xyz", frames)
    try:
        code, result = run_forked(lambda: _convert_capturing_stderr(tmp_path / "big.xyz", mnt / "ds"))
        assert code == 0, f"convert killed its process (exit {code})"
        status, err = result
        assert status == 2, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and "no space left" in err
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
