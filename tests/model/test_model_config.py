"""ModelConfig: JSON round trip, unknown keys, validation messages, per-head statistics."""
import json

import pytest

from foundation import ModelConfig


def test_round_trip(tmp_path):
    cfg = ModelConfig(elements=["H", "O"], heads=["a", "b"], atomic_energies={"a": [-1.0, -2.0], "b": [-3.0, -4.0]},
                      scale={"a": 1.5, "b": 2.0}, shift=0.1, max_L=2, dtype="float32", long_range={"kind": "coulomb"})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    assert json.loads(cfg.to_json())["shift"] == {"a": 0.1, "b": 0.1}
    assert cfg.atomic_numbers == [1, 8] and cfg.head_index("b") == 1 and cfg.head_index(None) == 0


def test_unknown_key_names_the_nearest_field():
    with pytest.raises(ValueError, match="num_channel.*did you mean 'num_channels'"):
        ModelConfig.from_dict({"elements": ["H"], "num_channel": 8})
    with pytest.raises(ValueError, match="elements"):
        ModelConfig.from_dict({"r_max": 5.0})
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        ModelConfig.from_json("nothere.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{bad json")


@pytest.mark.parametrize("field, value, message", [
    ("elements", [], "elements is empty"),
    ("elements", ["H", "Xx"], "unknown chemical symbols"),
    ("elements", ["H", "H"], "more than once"),
    ("r_max", -1.0, "r_max must be a positive"),
    ("max_L", 3, "max_L"),
    ("max_ell", 0, "max_ell"),
    ("correlation", 4, "correlation must be 1, 2 or 3"),
    ("num_poly_cutoff", 1, "num_poly_cutoff"),
    ("radial_mlp", [64, 0], "radial_mlp"),
    ("heads", ["a", "a"], "duplicates"),
    ("atomic_energies", {"default": [1.0]}, "one finite energy"),
    ("atomic_energies", {"other": [1.0, 2.0]}, "one entry per head"),
    ("scale", 0.0, "non-zero"),
    ("avg_num_neighbors", 0.0, "avg_num_neighbors"),
    ("dtype", "float16", "dtype must be one of"),
    ("long_range", {"kind": "magic"}, "long_range"),
])
def test_validation_messages(field, value, message):
    fields = dict(elements=["H", "O"], max_L=1)
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_preset_with_overrides():
    cfg = ModelConfig.preset("medium", elements=["H", "C"], num_channels=16, heads=["x", "y"])
    assert (cfg.max_L, cfg.num_channels, cfg.r_max, cfg.correlation, cfg.heads) == (1, 16, 6.0, 3, ["x", "y"])
    assert cfg.atomic_energies == {"x": [0.0, 0.0], "y": [0.0, 0.0]}
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge", elements=["H"])
    with pytest.raises(ValueError, match="did you mean 'r_max'"):
        ModelConfig.preset("small", elements=["H"], rmax=5.0)
