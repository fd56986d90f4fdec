"""The recipe loader (``foundation.recipe``): one layout for every job, strict keys, readable YAML errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from foundation.distill.config import DistillConfig, load_distill_config
from foundation.finetune.config import FinetuneConfig, load_finetune_config
from foundation.learn.config import load_learn_config
from foundation.recipe import apply_overrides, load_recipe, read_recipe
from foundation.train.config import TrainConfig, load_config, training_keys

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LOADERS = {"pretrain": load_config, "bench": load_config, "finetune": load_finetune_config,
           "distill": load_distill_config, "learn": load_learn_config}


def shipped() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "bench").glob("*.yaml"))


def loader(path: Path):
    return LOADERS["bench" if path.parent.name == "bench" else path.name.split("_")[0]]


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_with_the_training_keys_at_the_top(path):
    """One layout: the same --set path reaches the same training key in every job's recipe."""
    config = loader(path)(path, ["max_steps=3", "optim.lr=0.0123", "data.max_atoms=77"])
    assert isinstance(config, TrainConfig)
    assert config.max_steps == 3 and config.optim.lr == pytest.approx(0.0123) and config.data.max_atoms == 77
    plain = training_keys(config)
    assert type(plain) is TrainConfig and plain.max_steps == 3 and plain.out_dir == config.out_dir


def test_job_sections_and_job_defaults():
    ft = load_finetune_config(RECIPES / "finetune_demo_cuau.yaml")
    assert isinstance(ft, FinetuneConfig) and ft.finetune.strategy == "replay" and ft.replay.weight == 0.5
    dc = load_distill_config(RECIPES / "distill_own_model.yaml")
    assert isinstance(dc, DistillConfig) and dc.model.preset == "student" and dc.labels.hvp_off_at_force_mae > 0
    assert DistillConfig.from_dict({"teacher": {"model": "x"}, "seeds": {"builtin": "copper"}}).model.preset \
        == "student"
    with pytest.raises(ValueError, match="'model' is not used in fine-tuning"):
        load_finetune_config(RECIPES / "finetune_demo_cuau.yaml", ["model.preset=small"])


def test_broken_yaml_is_one_line_naming_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("max_steps: 10\noptim: {lr: 0.1\nseed: 3\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = str(err.value)
    assert "broken.yaml" in message and "not valid YAML" in message and "line" in message
    assert "\n" not in message
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        read_recipe(path)
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_overrides({}, ["data.train=[a, b"])


def test_load_recipe_is_generic_over_config_classes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max_steps: 5\n")
    assert load_recipe(TrainConfig, path).max_steps == 5
    with pytest.raises(ValueError, match=r"r\.yaml: .*base\.model"):
        load_recipe(FinetuneConfig, path)
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        load_recipe(TrainConfig, tmp_path / "nothing.yaml")


def test_cli_reports_a_broken_recipe_in_one_line(tmp_path, capsys):
    from foundation.cli import main
    path = tmp_path / "broken.yaml"
    path.write_text("max_steps: [1\n")
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfemax_steps: 3\n", r"not UTF-8 text \(byte 0"),
    (b"max_steps: 3\noptim:\n  lr: 0.1\n  lr: 0.2\n", r"key 'lr' is given twice in one section at line 4"),
    (b"max_steps: 3\nmax_steps: 30\n", r"key 'max_steps' is given twice"),
])
def test_undecodable_or_ambiguous_yaml_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    """Regression (issue 18.12): a non-UTF-8 recipe gave a bare codec error without the file; a repeated key was
    silently replaced by its last value."""
    from foundation.cli import main
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_recipe(path)
    assert "broken.yaml" in str(err.value) and "\n" not in str(err.value)
    assert main(["pretrain", str(path)]) == 2
    out = capsys.readouterr().err.strip()
    assert "broken.yaml" in out and len(out.splitlines()) == 1
