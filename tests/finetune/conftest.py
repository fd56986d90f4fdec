"""The fine-tuning tests' base: a saved tiny random Cu/Ni model (head 'emt', non-trivial E0/scale/shift) and
EMT-labelled extxyz files (new data with Al, a new element; old data without)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_helpers import R_MAX, emt_frames  # noqa: E402

from foundation.model import FoundationModel, ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ase.io import write
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small", elements=["Ni", "Cu"], num_channels=8, max_L=1, num_layers=2, r_max=R_MAX,
                             heads=["emt"], atomic_energies=[-0.3, -0.2], scale=0.5, shift=0.05,
                             avg_num_neighbors=12.0)
    base = FoundationModel(cfg)
    base.save_pretrained(root / "base")
    write(root / "new_train.xyz", emt_frames(24, seed=1), format="extxyz")
    write(root / "new_valid.xyz", emt_frames(8, seed=2), format="extxyz")
    write(root / "old.xyz", emt_frames(16, seed=3, elements=(29, 28)), format="extxyz")
    return root
