"""Every shipped recipe runs as shipped: its own data paths (relative to the repository root), only step counts
and sizes overridden. The working directory mirrors a checkout: data/rmd17 and data/mlearn from the repository,
the demo corpus made by ``foundation data generate --preset tiny`` (the shipped recipes read ``data/demo``),
``imported`` (an imported mace-torch model) and ``runs/pretrain_small/model`` made by the shipped pretraining
recipe, which the fine-tuning and distillation recipes start from."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from foundation.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
QUICK = ["max_steps=2", "valid_every=2", "checkpoint_every=2", "log_every=1", "progress=false"]
SMALL_DISTILL = ["configurations.md_steps=0", "configurations.rattle_copies=1", "configurations.strain_copies=1",
                 "onpolicy.md_steps=4", "onpolicy.interval=2", "onpolicy.seeds=1", "onpolicy.pick=2",
                 "onpolicy.steps=1", "report.speed_steps=2", "report.speed_repeats=1", "report.nve_steps=2",
                 "seeds.max_structures=2", "seeds.max_reference=1", "labels.hvp_vectors=1", "onpolicy.pick=1"]
SMALL_LEARN = ["base.build.max_steps=2", "base.build.md_steps=0", "base.build.rattle_copies=1", "committee.size=2",
               "init.rattle_copies=0", "explore.steps=4", "explore.interval=2", "explore.temperatures=[600.0]",
               "stop.max_iterations=1", "test.md_frames=2"]
SIZES = {"pretrain_small": [], "finetune_demo_cuau": ["replay.samples=20"], "finetune_mlearn_si": ["replay.samples=20"],
         "finetune_rmd17_aspirin": [], "finetune_charges_xtb": [], "distill_own_model": SMALL_DISTILL,
         "distill_sevenn_si": SMALL_DISTILL, "bench/rmd17": [], "bench/mlearn_si": [], "learn_cuau_emt": SMALL_LEARN,
         "finetune_imported_mace": []}


def test_the_table_names_every_shipped_recipe():
    found = {p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml")}
    assert found == set(SIZES)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory laid out like a checkout, with the pretrained base the other recipes name."""
    pytest.importorskip("tblite")
    from foundation.data.generate import generate
    from foundation.interop.mace import import_mace
    root = tmp_path_factory.mktemp("checkout")
    (root / "data").mkdir()
    for name in ("rmd17", "mlearn"):
        os.symlink(REPO / "data" / name, root / "data" / name)
    generate("tiny", root / "data" / "demo", seed=0)
    # what `foundation import mace` makes of a Cu-Au model trained with mace_run_train (the interop fixture's dump)
    import_mace(REPO / "tests" / "interop" / "fixtures" / "trained", root / "imported", license="mit")
    _bench_data(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["pretrain", str(RECIPES / "pretrain_small.yaml"), *_sets("pretrain_small")]) == 0
    finally:
        os.chdir(cwd)
    assert (root / "runs" / "pretrain_small" / "model" / "config.json").is_file()
    return root


def _bench_data(root: Path) -> None:
    """What scripts/bench_accuracy.py converts before it runs the bench recipes (here 12 + 4 frames)."""
    from foundation.data.convert import convert
    from foundation.data.readers import read_atoms
    for name, source in (("bench_rmd17", "rmd17/rmd17_ethanol_train_01.xyz.xz"), ("bench_mlearn_si",
                                                                                   "mlearn/Si_train.xyz.xz")):
        frames = read_atoms(REPO / "data" / source, ":16")
        for split, part in (("train", frames[:12]), ("valid", frames[12:])):
            work = root / "runs" / name / f"{split}.xyz"
            work.parent.mkdir(parents=True, exist_ok=True)
            from ase.io import write
            write(work, part, format="extxyz")
            convert([work], root / "runs" / name / "lmdb" / split, progress=False)


def _sets(name: str) -> list[str]:
    out = []
    for s in QUICK + SIZES[name]:
        out += ["--set", s]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SIZES if n != "pretrain_small"])
def test_recipe_runs_as_shipped(workspace, name, monkeypatch, capsys):
    if name == "distill_sevenn_si":
        pytest.importorskip("sevenn")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workspace)
    verb = {"finetune": "finetune", "distill": "distill", "learn": "learn"}.get(name.split("_")[0], "pretrain")
    recipe = RECIPES / f"{name}.yaml"
    assert cli([verb, str(recipe), *_sets(name)]) == 0
    import yaml
    out_dir = workspace / yaml.safe_load(recipe.read_text())["out_dir"]
    config = json.loads((out_dir / "model" / "config.json").read_text())
    assert config["model_config"]["elements"] and (out_dir / "model" / "model.safetensors").is_file()
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)   # keep the temporary checkout small
