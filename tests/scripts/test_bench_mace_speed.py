"""scripts/bench_mace_speed.py without mace-torch: arguments, the table, and the import of a dump it times."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_mace_speed.py"
DUMP = ROOT / "tests" / "interop" / "fixtures" / "mp0_float32"  # small MP-0 type dump, mace references inside


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script(SCRIPT)


def test_arguments(bench):
    args = bench.parse_args(["--mace-python", "/x/python"])
    assert args.threads == [1, 2] and args.dtypes == ["float32"]
    assert args.workloads == ["cu_ef", "cu_efs", "asp_ef", "asp_efs"]
    assert bench.parse_args(["--dump", "d", "--threads", "2", "--dtypes", "float32,float64"]).dtypes == [
        "float32", "float64"]
    for bad in ([], ["--dump", "d", "--workloads", "cu_train"], ["--dump", "d", "--dtypes", "float16"],
                ["--dump", "d", "--mace-python", "/x/python"]):  # the last one lacks --mace-model
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_table_and_deviation(bench):
    row = {"threads": 2, "dtype": "float32", "workload": "cu_efs", "atoms": 256, "ours": 400.0,
           "ours_range": [380.0, 410.0], "mace": 100.0, "mace_range": [95.0, 104.0], "paired": 3.9, "load": [2.5, 2.7]}
    table = bench.format_table([row, {**row, "workload": "asp_ef", "mace": None, "mace_range": None, "paired": None}])
    lines = table.splitlines()
    assert lines[0].startswith("| workload | threads | dtype | ours (atom-steps/s) | mace-torch")
    assert lines[2] == ("| Cu 256 E+F+S | 2 | float32 | 400.0 (380.0–410.0) | 100.0 (95.0–104.0) | 4.00× | 3.90× | "
                        "2.5 → 2.7 |")
    assert lines[3].split(" | ")[4:7] == ["–", "–", "–"]
    dev = bench.deviation({"energy": [10.0], "forces": [0.1, 0.2]}, {"energy": [10.00001], "forces": [0.1, 0.3]}, 1e-5)
    assert dev["energy"][3] and not dev["forces"][3] and "stress" not in dev
    assert dev["forces"][0] == pytest.approx(0.1) and dev["forces"][2] == pytest.approx(1 / 3)


def test_imported_side_reproduces_mace(bench):
    """The side the script times is the imported model: mace's own reference values, float32 tolerance."""
    side = bench.ImportedSide(DUMP, "float32")
    ref = json.loads((DUMP / "reference.json").read_text())
    for name, s in ref["structures"].items():
        atoms = Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
        out = side.infer(atoms, bool(atoms.pbc.any()), 1.0)()
        for q in ("energy", "forces") + (("stress",) if atoms.pbc.any() else ()):
            ours, theirs = out[q].detach().double().numpy().reshape(-1), np.asarray(s[q]).reshape(-1)
            assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), (name, q)


def test_quick_run_ours_only(bench, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert bench.main(["--dump", str(DUMP), "--quick", "--threads", "1", "--json", str(out)]) == 0
    assert "| Cu 256 E+F | 1 | float32 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["workload"] for r in result["rows"]] == ["cu_ef", "cu_efs", "asp_ef", "asp_efs"]
    assert all(r["ours"] > 0 and r["mace"] is None for r in result["rows"])
    assert result["rows"][0]["atoms"] == 256 and result["rows"][2]["atoms"] == 21
    assert result["same_function"] and "excluded" in result["neighbor_list"]
