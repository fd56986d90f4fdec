"""scripts/study_pretraining.py: disjoint, nested frame selections; the comparison and tables; the --quick study
end to end on the DFT data shipped in data/."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "study_pretraining.py"
DATA = REPO / "data"


@pytest.fixture(scope="module")
def study(load_script):
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def data(load_script):
    return load_script(REPO / "scripts" / "_pretraining_data.py")


def test_paracetamol_split_nested_disjoint_spread(data):
    s = data.paracetamol_split(1000, [10, 50, 200], 50)
    assert [len(s[f"train{n}"]) for n in (10, 50, 200)] == [10, 50, 200] and len(s["valid"]) == 50
    assert set(s["train10"]) <= set(s["train50"]) <= set(s["train200"])          # nested subsets
    assert not set(s["valid"]) & set(s["train200"])                               # validation held out
    assert np.diff(s["train10"]).tolist() == [100] * 9                            # spread over the time series
    with pytest.raises(ValueError, match="overlap"):
        data.paracetamol_split(1000, [500], 50)                                  # spacing 2 hits index 2 mod 20


def test_li_split_seeded_nested_disjoint(data):
    s = data.li_split(241, [10, 50, 200], 20, seed=0)
    assert len(s["valid"]) == 20 and len(s["train200"]) == 200
    assert set(s["train10"]) <= set(s["train50"]) <= set(s["train200"])
    assert not set(s["valid"]) & set(s["train200"])
    assert np.array_equal(s["valid"], data.li_split(241, [10], 20, seed=0)["valid"])
    assert not np.array_equal(s["valid"], data.li_split(241, [10], 20, seed=1)["valid"])
    with pytest.raises(ValueError, match="lower --sizes"):
        data.li_split(241, [230], 20, seed=0)


def _row(target, n, arm, e, f):
    return {"target": target, "frames": n, "arm": arm, "params": 100, "cpu_seconds": 12.0, "e_mae_mev_atom": e,
            "e_mae_mev": 20 * e, "f_mae_mev_A": f, "s_mae_mev_A3": None, "curve": {}, "zero_shot_valid": None}


def test_comparison_and_tables(study):
    rows = [_row("li", 10, "finetuned", 2.0, 50.0), _row("li", 10, "scratch", 4.0, 40.0),
            _row("li", 50, "finetuned", 1.0, 30.0)]                                  # no scratch partner: no row
    comp = study.comparison(rows)
    assert len(comp) == 1 and comp[0]["e_ratio"] == pytest.approx(0.5) and comp[0]["f_ratio"] == pytest.approx(1.25)
    lines = study.format_comparison(comp).splitlines()
    assert lines[1].split() == ["li", "10", "2.00", "4.00", "0.50", "50.0", "40.0", "1.25"]
    table = study.format_rows(rows).splitlines()
    assert len(table) == 4 and table[2].split() == ["li", "10", "scratch", "100", "12", "4.00", "80.0", "40.0", "-"]


def test_pretrain_recipe_has_a_head_per_level_of_theory(study):
    from foundation.train.config import config_from_dict
    a = study.parse_args(["--quick"])
    paths = {"d/pre-Si": "pbe_vasp", "d/pre-ethanol": "pbe_def2svp"}
    config = config_from_dict(study.pretrain_values(a, paths, Path("out")))
    assert config.data.heads == ["pbe_vasp", "pbe_def2svp"] and config.max_steps == a.pretrain_steps
    data = {"li": {"train": {10: "d/li10"}, "valid": "d/li-valid"}}
    ft = study.target_values(a, "li", 10, "finetuned", data, Path("o1"), Path("base"))
    sc = study.target_values(a, "li", 10, "scratch", data, Path("o2"), Path("base"))
    same = ("max_steps", "optim", "schedule", "loss", "ema")
    assert all(ft[k] == sc[k] for k in same) and ft["data"]["max_atoms"] == sc["data"]["max_atoms"]
    assert ft["base"]["head"] == "pbe_vasp" and ft["finetune"]["add_elements"]
    assert "stress" in ft["loss"]["coefficients"]


def test_arguments(study):
    a = study.parse_args(["--sizes", "50,10", "--arms", "scratch,rescaled", "--targets", "li"])
    assert a.sizes == [10, 50] and a.arms == ["scratch", "rescaled"] and a.targets == ["li"]
    for bad in (["--arms", "finetune"], ["--targets", "aspirin"]):
        with pytest.raises(ValueError, match="unknown --targets/--arms"):
            study.parse_args(bad)


@pytest.mark.slow
def test_quick_study_end_to_end(study, tmp_path, capsys):
    """The whole study at smoke-test size on the real DFT data: every run of the table, finite errors,
    learning curves, the figure and the JSON."""
    import torch
    threads = torch.get_num_threads()
    try:
        assert study.main(["--quick", "--out", str(tmp_path / "study"), "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert {"settings", "pretrain", "rows", "comparison", "training_cpu_seconds", "figure"} <= set(result)
    assert [(r["target"], r["frames"], r["arm"]) for r in result["rows"]] == [
        ("paracetamol", 10, "finetuned"), ("paracetamol", 10, "scratch"), ("li", 10, "finetuned"),
        ("li", 10, "scratch")]
    for r in result["rows"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("e_mae_mev_atom", "f_mae_mev_A", "cpu_seconds"))
        assert r["curve"]["step"][-1] == 4 and all(math.isfinite(x) for x in r["curve"]["forces_mae"])
    li = [r for r in result["rows"] if r["target"] == "li"]
    assert all(r["s_mae_mev_A3"] is not None for r in li)               # periodic Li: stress evaluated
    assert li[0]["params"] > li[1]["params"]                            # fine-tuned model keeps Si, Ge, Mo, H..O rows
    assert {"pre-Si/pbe_vasp/forces", "pre-uracil/pbe_def2svp/forces"} <= set(result["pretrain"]["metrics"])
    assert len(result["comparison"]) == 2 and all(c["f_ratio"] > 0 for c in result["comparison"])
    assert Path(result["figure"]).stat().st_size > 10_000
    assert "paracetamol      10" in out and "training CPU time" in out
