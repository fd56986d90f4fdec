"""scripts/bench_torch_sim.py: both sides run the same systems with the same model, and the table is printed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_sim", reason="the [torchsim] extra (torch-sim-atomistic) is not installed")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_torch_sim.py"


def test_quick_run_prints_the_table_and_writes_json(load_script, tmp_path, capsys):
    bench = load_script(SCRIPT)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--dtype", "float64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| systems N | atoms/system | torch-sim (atom-steps/s) | ASE loop (atom-steps/s)" in printed
    assert "load average" in printed
    result = json.loads(out.read_text())
    assert [r["systems"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["atoms_per_system"] == 8
        assert row["torch_sim_atom_steps_per_s"] > 0 and row["ase_atom_steps_per_s"] > 0
        assert row["first_energy_max_abs_diff_eV"] < 1e-8  # float64: the two sides compute the same energies
    assert result["meta"]["dtype"] == "float64" and result["meta"]["torch_sim"]
