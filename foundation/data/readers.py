"""Stream structures out of input files, one at a time (never a whole file in memory).

- extended XYZ (``.xyz``/``.extxyz``, optionally ``.gz``/``.bz2``/``.xz``): split into frames here and parsed
  frame by frame by ASE, so a bad frame (unknown element, malformed line, truncated end)
  is reported with its index and the rest can go on;
- ASE databases (``.db``, ``.json``) and fairchem ``.aselmdb`` (ase-db-backends): row by row, with the row's
  key-value pairs in ``atoms.info`` and its per-atom data arrays in ``atoms.arrays``;
- everything else ASE reads (VASP OUTCAR/vasprun.xml, CIF, ...): ``ase.io.iread``.

``iter_structures(path)`` yields ``(index, atoms_or_error)``: an ``Exception`` in place of the atoms is a
record that could not be parsed (the caller decides whether to stop or skip it). ``read_atoms(path, index)`` is
``ase.io.read`` for code that wants a list (recipes' structure files, test sets), fast on compressed files.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase import Atoms

XYZ_SUFFIXES = {".xyz", ".extxyz"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # compressed extxyz, decompressed as a stream
DB_SUFFIXES = {".db": "db", ".json": "json", ".aselmdb": "aselmdb"}


def iter_structures(path: str | os.PathLike) -> Iterator[tuple[int, Atoms | Exception]]:
    """Yield (record index, Atoms or the parse error of that record) for every structure in ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; check the path")
    suffixes = [x.lower() for x in path.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    suffix = (suffixes[-2] if opener and len(suffixes) > 1 else "") if opener else path.suffix.lower()
    if suffix in XYZ_SUFFIXES:
        yield from _iter_extxyz(path, opener or open)
    elif suffix in DB_SUFFIXES:
        yield from _iter_db(path, DB_SUFFIXES[suffix])
    else:
        yield from _iter_ase(path)


def read_atoms(path: str | os.PathLike, index: str | int | slice = ":") -> list[Atoms]:
    """``ase.io.read(path, index)`` as a list (an int index gives one structure), for any format ASE reads.

    A ``.gz``/``.bz2``/``.xz`` file is decompressed once into a temporary file first: ASE seeks inside the
    compressed stream, and every backward seek decompresses from the start (a 1000-frame ``.xyz.xz`` took 57 s
    instead of 0.4 s)."""
    import tempfile

    import ase.io
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} not found; check the path")
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        frames = ase.io.read(str(path), index)
    else:
        with tempfile.TemporaryDirectory(prefix="foundation-read-") as tmp:
            plain = Path(tmp) / path.stem                       # the name without .xz: ASE guesses the format
            with opener(path, "rb") as src, open(plain, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            frames = ase.io.read(str(plain), index)
    return [frames] if isinstance(frames, Atoms) else list(frames)


def _iter_extxyz(path: Path, opener=open) -> Iterator[tuple[int, Atoms | Exception]]:
    from ase.io.extxyz import read_xyz
    index, line_no = 0, 0
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        while True:
            first = fh.readline()
            line_no += 1
            if not first:
                return
            if not first.strip():
                continue
            try:
                natoms = int(first.split()[0])
                if natoms < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}, line {line_no} (record {index}): expected the atom count of an extxyz "
                                 f"frame, found {first.strip()[:60]!r}; the file is corrupted or not extxyz") from None
            lines = [first]
            for _ in range(natoms + 1):
                line = fh.readline()
                if not line:
                    break
                lines.append(line)
            line_no += len(lines) - 1
            if len(lines) < natoms + 2:
                yield index, ValueError(f"truncated frame: {len(lines) - 2} of {natoms} atom lines before end of file")
                return
            try:
                atoms = next(read_xyz(io.StringIO("".join(lines)), 0))
            except Exception as exc:  # noqa: BLE001 - any parse failure is this record's error
                yield index, _describe(exc)
            else:
                yield index, atoms
            index += 1


def _describe(exc: Exception) -> Exception:
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        key = exc.args[0]
        if key[:1].isupper() and key.isalpha() and len(key) <= 3:
            return ValueError(f"unknown element symbol {key!r}")
        return ValueError(f"cannot parse: missing key {key!r}")
    return ValueError(f"cannot parse: {exc}")


def _iter_db(path: Path, kind: str) -> Iterator[tuple[int, Atoms | Exception]]:
    from ase.db import connect
    kwargs = {"readonly": True} if kind == "aselmdb" else {}
    try:
        db = connect(str(path), type=kind, use_lock_file=False, **kwargs)
        rows = db.select()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path} cannot be opened as an ASE {kind} database ({exc}); check the file") from None
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the database itself is unreadable from here on
            raise ValueError(f"{path}, record {index}: cannot read row ({exc}); the database is corrupted") from None
        try:
            atoms = _row_to_atoms(row)
        except Exception as exc:  # noqa: BLE001
            yield index, _describe(exc)
        else:
            yield index, atoms
        index += 1
    # the environment of an .aselmdb is closed when ``db`` is garbage-collected


def _row_to_atoms(row) -> Atoms:
    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    n = len(atoms)
    for key, value in (row.get("data") or {}).items():
        arr = np.asarray(value) if not isinstance(value, (str, dict)) else None
        if arr is not None and arr.ndim >= 1 and arr.shape[0] == n and arr.dtype.kind in "fiub":
            atoms.arrays[key] = arr
        else:
            atoms.info[key] = value
    return atoms


def _iter_ase(path: Path) -> Iterator[tuple[int, Atoms | Exception]]:
    import ase.io
    index = 0
    try:
        for atoms in ase.io.iread(str(path), index=":"):
            yield index, atoms
            index += 1
    except Exception as exc:  # noqa: BLE001 - a generic reader cannot resume after a failure
        raise ValueError(f"{path}, record {index}: ASE cannot read it ({type(exc).__name__}: {exc}); "
                         f"fix the file or pass a supported format") from None
