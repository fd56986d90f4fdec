"""scripts/bench_distill.py: equal total steps for every variant (on-policy included), and a --quick run end to end
with an EMT teacher on built-in copper (three variants in parallel processes, the merged JSON and table)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_distill.py"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script(SCRIPT)


def _value(sets: list[str], key: str) -> str:
    return [s.split("=", 1)[1] for s in sets if s.startswith(key + "=")][-1]


def test_every_variant_trains_the_same_total_steps(bench):
    args = bench.parse(["--steps", "300", "--onpolicy-rounds", "2", "--onpolicy-steps", "50",
                        "--set", "optim.lr=0.01"])
    assert args.variant_list == ["hvp", "ef", "onpolicy"]
    totals = {}
    for i, v in enumerate(args.variant_list):
        sets = bench.overrides(args, v, first=i == 0)
        rounds = int(_value(sets, "onpolicy.rounds"))
        totals[v] = int(_value(sets, "max_steps")) + rounds * int(_value(sets, "onpolicy.steps"))
        assert _value(sets, "optim.lr") == "0.01"                     # --set reaches every variant
        assert float(_value(sets, "loss.coefficients.hvp")) == (0.0 if v == "ef" else 5.0)
        assert _value(sets, "report.nve_steps") == ("200" if i == 0 else "0")   # speed/NVE measured once
    assert totals == {"hvp": 300, "ef": 300, "onpolicy": 300}
    assert int(_value(bench.overrides(args, "onpolicy", False), "onpolicy.rounds")) == 2
    with pytest.raises(ValueError, match="--onpolicy-steps"):
        bench.overrides(bench.parse(["--steps", "100", "--onpolicy-rounds", "2", "--onpolicy-steps", "50"]),
                        "onpolicy", False)
    with pytest.raises(SystemExit):
        bench.parse(["--variants", "hvp,nonsense"])


@pytest.mark.slow
def test_quick_run_with_an_emt_teacher(bench, tmp_path, capsys):
    tiny = {"num_channels": 8, "radial_mlp": [8], "readout_mlp": 4, "max_ell": 1, "r_max": 4.0}
    recipe = {"teacher": {"calculator": "ase.calculators.emt:EMT", "name": "EMT"},
              "model": {"preset": "student", "overrides": tiny},
              "seeds": {"builtin": "copper"}, "configurations": {"temperatures": [300.0]},
              "ground_truth": {"weight": 0.0},
              "engine": {"zero_stage": 0}, "data": {"valid_fraction": 0.3},
              "loss": {"coefficients": {"energy": 1.0, "forces": 10.0, "stress": 1.0}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--recipe", str(path), "--out", str(tmp_path / "runs"), "--onpolicy-rounds", "1",
                       "--parallel", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["variants"] == ["hvp", "ef", "onpolicy"] and result["finite"] and result["parallel"]
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.log")) == ["ef.log", "hvp.log", "onpolicy.log"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["E/F/S + H v (coef 5)", "E/F/S only", "E/F/S + H v + 1 on-policy"]
    for r in rows.values():
        assert r["steps"] == 4 and math.isfinite(r["F_vs_teacher"]) and r["F_vs_teacher"] > 0
        assert r["F_student_vs_dft"] is None                      # built-in seeds: no reference labels
    assert rows["E/F/S only"]["Hv_vs_teacher"] is not None         # H v error is measured for every variant
    assert result["speed"]["speedup"] > 0 and result["nve"]["steps"] == 5
    assert len(result["configurations"]["onpolicy"]) == 2           # teacher labels + one on-policy round
    assert len(result["configurations"]["hvp"]) == 1
    for r in rows:
        assert any(line.startswith(r) for line in printed.splitlines()), r
    assert "load average" in printed
    # --speed-of: the speed of the trained student alone, re-measured on the same structure
    speed = tmp_path / "speed.json"
    assert bench.main(["--quick", "--recipe", str(path), "--out", str(tmp_path / "runs"), "--speed-repeats", "2",
                       "--speed-of", str(tmp_path / "runs" / "hvp" / "model"), "--json", str(speed)]) == 0
    sp = json.loads(speed.read_text())
    assert sp["repeats"] == 2 and sp["structure"] == result["speed"]["structure"] and sp["speedup"] > 0
    assert len(sp["all_runs_atom_steps_per_s"]["student"]) == 2
