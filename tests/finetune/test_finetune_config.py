"""FinetuneConfig: recipe sections, options that could not take effect are errors, shipped recipes validate."""
from __future__ import annotations

from pathlib import Path

import pytest
from finetune_helpers import recipe

from foundation.finetune.config import finetune_config_from_dict


@pytest.mark.parametrize("sections, message", [
    ({"finetune": {"strategy": "replay", "head": "t"}}, "replay.data is empty"),
    ({"finetune": {"strategy": "replay", "head": "t"}, "replay": {"data": []}}, "replay.data is empty"),
    ({"finetune": {"strategy": "full"}, "replay": {"data": ["x"]}}, "replay: section but"),
    ({"finetune": {"strategy": "frozen"}, "lora": {"rank": 2}}, "lora: section but"),
    ({"finetune": {"strategy": "replay"}, "replay": {"data": ["x"]}}, "name it with finetune.head"),
    ({"finetune": {"stratgy": "full"}}, "did you mean 'strategy'"),
    ({"replay_data": ["x"]}, "unknown recipe key 'replay_data'"),
    ({"model": {"preset": "small"}}, "architecture comes from base.model"),
    ({"base": {"model": "org/name"}}, "pin base.revision"),
])
def test_options_that_cannot_take_effect_are_errors(setup, sections, message):
    with pytest.raises(ValueError, match=message):
        finetune_config_from_dict(recipe(setup, "err", **sections))


def test_data_heads_are_set_by_finetuning(setup):
    values = recipe(setup, "err")
    values["data"]["heads"] = ["x"]
    with pytest.raises(ValueError, match="finetune.head"):
        finetune_config_from_dict(values)


@pytest.mark.parametrize("name", ["finetune_mlearn_si", "finetune_rmd17_aspirin", "finetune_charges_xtb"])
def test_shipped_recipes_are_valid(name):
    from foundation.finetune.config import load_finetune_config
    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    config = load_finetune_config(path)
    assert config.base.model == "runs/pretrain_small/model" and config.out_dir == f"runs/{name}"
    assert config.max_steps >= 100
