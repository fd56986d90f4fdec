"""TrainConfig: strict recipe loading, --set overrides, validation messages."""
from __future__ import annotations

from pathlib import Path

import pytest

from foundation.recipe import apply_overrides
from foundation.train.config import TrainConfig, config_from_dict, config_to_dict, load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_shipped_recipe_loads_with_expected_values():
    cfg = load_config(RECIPES / "pretrain_small.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.engine.zero_stage in (0, 1, 2)
    assert cfg.data.heads == ["emt", "gfn2_xtb"] and len(cfg.data.train) == 2
    assert cfg.loss.schedule[0].start == pytest.approx(0.8)
    assert cfg.loss.schedule[0].coefficients["energy"] > cfg.loss.coefficients["energy"]


@pytest.mark.parametrize("values, named, nearest", [
    ({"optim": {"lr_rate": 1e-3}}, "optim.lr_rate", "lr"),
    ({"optimm": {"lr": 1e-3}}, "optimm", "optim"),
    ({"engine": {"zero_stag": 1}}, "engine.zero_stag", "zero_stage"),
    ({"loss": {"schedule": [{"strat": 0.5}]}}, "loss.schedule[0].strat", "start"),
    ({"loss": {"coefficients": {"forcs": 1.0}}}, "loss.coefficients.forcs", "forces"),
])
def test_unknown_key_names_it_and_the_nearest_valid_key(values, named, nearest):
    with pytest.raises(ValueError) as err:
        config_from_dict(values)
    assert repr(named) in str(err.value) and f"did you mean {nearest!r}" in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max_step: 10\n")
    with pytest.raises(ValueError, match=r"r\.yaml.*'max_step'.*did you mean 'max_steps'"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("values, message", [
    ({"engine": {"zero_stage": 3}}, "zero_stage"),
    ({"max_steps": "many"}, "max_steps"),
    ({"loss": {"kind": "l1"}}, "loss.kind"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"data": {"train": ["a", "b"], "heads": ["x"]}}, "data.heads"),
    ({"ema": {"decay": 1.0}}, "ema.decay"),
    ({"loss": {"coefficients": {"energy": -1.0}}}, "loss.coefficients.energy"),
])
def test_invalid_values_are_errors_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_from_dict(values)


def test_set_overrides_are_typed_and_validated():
    values = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "data.train=[a, b]", "engine.zero_stage=2",
                                                      "ema.enabled=false", "data.valid=c"])
    cfg = config_from_dict(values)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.train == ["a", "b"] and cfg.data.valid == ["c"]
    assert cfg.engine.zero_stage == 2 and cfg.ema.enabled is False
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match="'optim.lrr'.*did you mean 'lr'"):
        config_from_dict(apply_overrides({}, ["optim.lrr=1"]))


def test_round_trip_through_dict():
    cfg = load_config(RECIPES / "pretrain_small.yaml", ["max_steps=7"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
