"""Calibration metrics on synthetic errors with a known distribution, and on a real committee."""
from __future__ import annotations

import numpy as np
import pytest
from learn_helpers import cuau, tiny_model

from foundation.learn import CommitteeModel
from foundation.learn.calibration import (
    calibrate,
    calibration_report,
    fit_recalibration,
    force_errors,
    miscalibration_area,
    spearman,
)


def synthetic(n=4000, seed=0, true_scale=1.0):
    """sigma per atom and error components drawn with standard deviation true_scale * sigma / sqrt(3)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.01, 0.5, n)
    comps = rng.standard_normal((n, 3)) * (true_scale * sigma / np.sqrt(3))[:, None]
    return sigma, np.linalg.norm(comps, axis=1), comps


def test_calibrated_uncertainty_scores_well():
    sigma, error, comps = synthetic()
    assert miscalibration_area(sigma, comps) < 0.02
    assert fit_recalibration(sigma, error) == pytest.approx(1.0, abs=0.03)
    assert spearman(sigma, error) > 0.5


def test_overconfident_uncertainty_is_found_and_fixed():
    sigma, error, comps = synthetic(true_scale=3.0)      # errors 3x larger than claimed
    assert miscalibration_area(sigma, comps) > 0.2
    s = fit_recalibration(sigma, error)
    assert s == pytest.approx(3.0, rel=0.03)
    assert miscalibration_area(s * sigma, comps) < 0.02
    report = calibration_report(sigma, error, comps, s)
    assert report["recalibration"] == s and report["miscalibration_area"] < 0.02
    # a rescaling does not change the ranking
    assert report["spearman"] == pytest.approx(spearman(sigma, error))


def test_spearman_is_rank_correlation():
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(10)))


def test_calibrate_a_committee_stores_the_factor_and_plots(tmp_path):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    committee = CommitteeModel.from_members([tiny_model(s) for s in range(3)])
    frames = []
    for s in range(6):
        a = cuau(s)
        a.calc = EMT()
        f = a.get_forces()
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=f)
        frames.append(a)
    sigma, error, comps = force_errors(committee, frames)
    assert sigma.shape == error.shape == (8 * 6,) and comps.shape == (48, 3)
    result = calibrate(committee, frames[:3], frames[3:], plot=tmp_path / "cal.png")
    s_val, e_val, _ = force_errors(CommitteeModel.from_members(list(committee.members)), frames[:3])
    assert committee.config.recalibration == pytest.approx(fit_recalibration(s_val, e_val))
    assert result["recalibrated"]["recalibration"] == committee.config.recalibration
    assert (tmp_path / "cal.png").stat().st_size > 1000
