"""Fixtures for the tests of scripts/: load a script file as a module (scripts/ is not a package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def load_script():
    """``load_script(path)`` -> the module object of the script file at ``path`` (its ``main`` is not run)."""
    def load(path: Path):
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
