"""Fixtures for the data tests."""
from pathlib import Path

import pytest
from data_helpers import emt_frames


@pytest.fixture(scope="session")
def emt_xyz(tmp_path_factory) -> tuple[Path, list]:
    """An extxyz file of 30 EMT-labelled frames and the frames as written."""
    import ase.io
    frames = emt_frames(30)
    path = tmp_path_factory.mktemp("emt") / "emt.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path, ase.io.read(path, ":")
