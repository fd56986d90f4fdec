"""How well a committee's uncertainty tracks its true force error, on held-out labelled structures.

Per atom i: predicted uncertainty sigma_i = ``forces_uncertainty`` (eV/Å, committee.py) and true error
e_i = |mean_k F_ik - F_i^true| (eV/Å). Reported:

- ``spearman``: Spearman rank correlation of sigma_i vs e_i (1 = the uncertainty orders atoms by their error);
- ``miscalibration_area``: with sigma_i / sqrt(3) the standard deviation of each Cartesian error component
  (so that E[e_i^2] = sigma_i^2 for a calibrated committee), the observed fraction of components inside the
  central Gaussian interval of probability p, against p on a grid of 101 points in [0, 1]; the area between that
  curve and the diagonal (trapezoid rule; 0 = calibrated, 0.5 at most);
- ``recalibration``: the one factor s minimising the Gaussian negative log-likelihood of the errors with
  uncertainty s * sigma: s^2 = mean_i(e_i^2 / sigma_i^2). Fitted on validation data and stored in the
  committee's config (``CommitteeModel.set_recalibration``); the metrics above are then reported for s * sigma.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import keys

_P_GRID = np.linspace(0.0, 1.0, 101)
_TINY = 1e-12   # eV/Å: floor of sigma (members that agree to the last bit)


def force_errors(committee, structures, dtype: str = "float64", max_atoms: int = 1024,
                 head: str | None = None) -> tuple[np.ndarray, ...]:
    """(sigma (n,), error (n,), components (n,3) of mean - true) in eV/Å over all atoms of ``structures``
    (ASE Atoms with reference forces from their calculator or ``arrays['forces']``), using a committee calculator
    on readout ``head`` (default: the first)."""
    from ..calculator import FoundationCalculator
    from ..data.labels import read_labels
    calc = FoundationCalculator(committee, head=head, dtype=dtype)
    results = calc.calculate_many(list(structures), max_atoms=max_atoms)
    sigma, diff = [], []
    for atoms, res in zip(structures, results):
        true = read_labels(atoms).get(keys.FORCES)
        if true is None:
            raise ValueError(f"structure {atoms.get_chemical_formula()} has no reference forces; calibration needs "
                             "labelled structures (forces in the file or a calculator's results)")
        sigma.append(res[keys.FORCES_UNCERTAINTY])
        diff.append(res["forces"] - np.asarray(true, np.float64))
    diff = np.concatenate(diff)
    return np.concatenate(sigma), np.linalg.norm(diff, axis=1), diff


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 points or a constant input."""
    from scipy.stats import spearmanr
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def calibration_curve(sigma: np.ndarray, components: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expected p (101,), observed fraction (101,)): fraction of error components with |z| inside the central
    interval of probability p, z = component / (sigma / sqrt(3))."""
    from scipy.stats import norm
    scale = np.maximum(np.asarray(sigma, float), _TINY)[:, None] / np.sqrt(3.0)
    z = np.abs(np.asarray(components, float) / scale).ravel()
    bounds = norm.ppf(0.5 + _P_GRID / 2)            # inf at p = 1
    observed = np.array([np.mean(z <= b) for b in bounds])
    return _P_GRID.copy(), observed


def miscalibration_area(sigma: np.ndarray, components: np.ndarray) -> float:
    """Area between the calibration curve and the diagonal (module docstring)."""
    p, observed = calibration_curve(sigma, components)
    gap = np.abs(observed - p)
    return float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(p)))


def fit_recalibration(sigma: np.ndarray, error: np.ndarray) -> float:
    """s = sqrt(mean(e^2 / sigma^2)): the NLL-optimal single scale of the uncertainty (module docstring)."""
    sigma = np.maximum(np.asarray(sigma, float), _TINY)
    if not len(sigma):
        raise ValueError("no atoms to fit the recalibration factor on; give validation structures")
    return float(np.sqrt(np.mean((np.asarray(error, float) / sigma) ** 2)))


def calibration_report(sigma: np.ndarray, error: np.ndarray, components: np.ndarray, factor: float = 1.0) -> dict:
    """{"atoms", "spearman", "miscalibration_area", "recalibration", "force_mae", "mean_uncertainty"} for the
    uncertainty ``factor * sigma`` (eV/Å)."""
    scaled = factor * np.asarray(sigma, float)
    return {"atoms": int(len(sigma)), "spearman": spearman(scaled, error),
            "miscalibration_area": miscalibration_area(scaled, components), "recalibration": float(factor),
            "force_mae": float(np.mean(np.abs(components))), "mean_uncertainty": float(np.mean(scaled))}


def calibrate(committee, validation, test, plot: str | Path | None = None, head: str | None = None) -> dict:
    """Fit the recalibration factor on ``validation`` structures, store it in ``committee`` and report the
    calibration on ``test`` before and after: {"raw": report, "recalibrated": report}; ``plot`` writes a PNG;
    ``head``: the readout head measured (default: the first)."""
    committee.set_recalibration(1.0)
    s_val, e_val, _ = force_errors(committee, validation, head=head)
    factor = fit_recalibration(s_val, e_val)
    sigma, error, comps = force_errors(committee, test, head=head)
    result = {"raw": calibration_report(sigma, error, comps), "recalibrated":
              calibration_report(sigma, error, comps, factor)}
    committee.set_recalibration(factor)
    if plot is not None:
        calibration_plot(sigma, error, comps, factor, plot)
    return result


def calibration_plot(sigma, error, components, factor: float, path: str | Path) -> Path:
    """Two panels: observed vs expected proportion (raw and recalibrated), and error vs uncertainty (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for s, name in ((1.0, "raw"), (factor, f"recalibrated (s = {factor:.3g})")):
        p, obs = calibration_curve(s * np.asarray(sigma), components)
        left.plot(p, obs, label=f"{name}: area {miscalibration_area(s * np.asarray(sigma), components):.3f}")
    left.plot([0, 1], [0, 1], "k--", lw=0.8)
    left.set(xlabel="expected proportion in interval", ylabel="observed proportion", title="calibration")
    left.legend(fontsize=8)
    right.loglog(np.maximum(factor * np.asarray(sigma), _TINY), np.maximum(error, _TINY), ".", ms=2, alpha=0.5)
    lim = [max(min(np.min(factor * sigma), np.min(error)), 1e-4), max(np.max(factor * sigma), np.max(error))]
    right.plot(lim, lim, "k--", lw=0.8)
    right.set(xlabel="predicted force uncertainty (eV/Å)", ylabel="|force error| (eV/Å)",
              title=f"Spearman {spearman(sigma, error):.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
