"""Fixtures shared by every test package: small EMT datasets converted to LMDB shards (``emt_data``), one torch
thread per test (tiny tensors gain nothing from threads; on a busy 2-core machine OpenMP barriers cost a lot).
``tests/`` is put on ``sys.path`` so that helper modules such as ``pair_model`` import from any test package."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emt_data import write_emt_dataset  # noqa: E402  (tests/ is on sys.path from here on)


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emt")
    return {"train": write_emt_dataset(root / "train", 40, seed=1),
            "train_nostress": write_emt_dataset(root / "train_nostress", 24, seed=3, stress=False),
            "valid": write_emt_dataset(root / "valid", 12, seed=2)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
