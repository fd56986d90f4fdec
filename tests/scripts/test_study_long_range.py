"""scripts/study_long_range.py: ion construction, test bands beyond the cutoff, and the --quick end-to-end run
(xTB labels -> LMDB -> two Trainer runs -> split errors, binding curves with the no-head physics check)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tblite")
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def study(load_script):
    return load_script(SCRIPTS / "study_long_range.py")


@pytest.fixture(scope="module")
def data(load_script):
    return load_script(SCRIPTS / "_long_range_data.py")


def test_ions_and_geometry_helpers(data):
    from ase.build import molecule
    formate = data._deprotonate(molecule("HCOOH"))
    assert formate.get_chemical_formula() == "CHO2"
    ammonium = data._protonate(molecule("NH3"))
    d = ammonium.get_all_distances()[0, 1:]
    assert ammonium.get_chemical_formula() == "H4N" and np.allclose(d, d.mean(), atol=0.05)   # near tetrahedral
    a, b = molecule("H2O"), molecule("NH3")
    a.positions -= a.get_center_of_mass()
    b.positions -= b.get_center_of_mass()
    pair = data.dimer(a, b, np.eye(3), np.eye(3), 7.0)
    assert pair.get_center_of_mass(indices=range(3, 7))[0] == pytest.approx(7.0)
    assert data.d_min(pair, 3) == pytest.approx(np.linalg.norm(pair.positions[:3, None] - pair.positions[None, 3:],
                                                                axis=-1).min())
    assert data.in_test_band(9.5) and not data.in_test_band(8.0)


def test_summary_splits_at_the_cutoff(study):
    rows = [{"de": 0.1, "natoms": 10, "df_sum": 3.0, "df_count": 30, "d_min": 3.0, "kind": "polar", "dq_a": 0.02},
            {"de": 0.5, "natoms": 5, "df_sum": 1.5, "df_count": 15, "d_min": 6.0, "kind": "ion pair", "dq_a": 0.1}]
    s = study.summarise(rows, r_max=4.5)
    assert s["all"]["fragment_charge_me"] == pytest.approx(60.0)
    assert s["far"]["fragment_charge_me"] == pytest.approx(100.0)
    assert s["near"]["count"] == 1 and s["far"]["count"] == 1
    assert s["far"]["energy_mev"] == pytest.approx(500.0) and s["far"]["energy_mev_per_atom"] == pytest.approx(100.0)
    assert s["all"]["forces_mev_per_a"] == pytest.approx(1000 * 4.5 / 45)


@pytest.mark.slow
def test_quick_run(study, data, tmp_path, capsys):
    assert study.main(["--quick", "--out", str(tmp_path), "--charge-loss", "0", "100", "--excess-loss", "1"]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    # quick: the last coefficient of each list only
    assert list(result["test"]) == ["without_lr", "with_lr_q100", "with_lr_x1"]
    for errors in result["test"].values():
        assert errors["far"]["count"] > 0   # the held-out bands reach beyond r_max
        assert all(math.isfinite(errors[s][k]) for s in ("far", "all")
                   for k in ("energy_mev", "energy_mev_per_atom", "forces_mev_per_a"))
    assert set(result["curves"]) == set(data.CURVES)
    for row in result["curves"].values():
        assert len(row["R"]) == len(row["xtb"]) == len(row["with_lr_q100"]) == len(row["without_lr"]) > 3
        assert row["without_lr_far_max_abs_eint"] <= 1e-9   # no shared edge: exactly additive
    ion = result["curves"]["HCOO(-)-NH4(+)"]
    assert max(ion["xtb"]) < -0.5   # xTB: the ion pair stays strongly bound beyond the cutoff
    assert (tmp_path / "long_range_binding.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    # 3 split rows + 1 per-kind row + the binding-curve header, for each model
    assert out.count("| without head |") == 5 and out.count("| with head, charges x100 |") == 5
    assert out.count("| with head, charge excess x1 |") == 5
    assert result["test"]["with_lr_x1"]["far"]["fragment_charge_me"] >= 0
    assert result["test"]["without_lr"]["far"]["fragment_charge_me"] is None
    assert result["curves"]["HCOO(-)-NH4(+)"]["charge_a"]["with_lr_q100"][-1] < 0   # formate's model charge
