"""The end of a ``foundation learn`` run: the final committee (recalibrated on half of the test set), the
calibration plot, ``learn_report.json`` and ``learn_report.png``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .loop import write_json


def finish(config, out: Path, committee, rows: list[dict], test: list, zero_shot: dict | None, log) -> dict:
    """Save the final committee to ``out/model`` and write the report; returns the report dict:
    {"iterations": rows, "labels_total", "base_zero_shot", "calibration", "model", "converged", "head" (the head
    the labels trained and every test metric measured), "replay" (the replay section, or None)}."""
    from ..recipe import to_dict
    from .calibration import calibrate
    from .loop import replayed
    calibration = None
    if len(test) >= 2:
        calibration = calibrate(committee, test[0::2], test[1::2], plot=out / "calibration.png", head=config.head)
        calibration["fitted_on"], calibration["reported_on"] = len(test[0::2]), len(test[1::2])
        log(f"recalibration factor {committee.config.recalibration:.3g} (fitted on {len(test[0::2])} test frames); "
            f"on the other {len(test[1::2])}: Spearman {calibration['recalibrated']['spearman']:.3f}, "
            f"miscalibration area {calibration['raw']['miscalibration_area']:.3f} -> "
            f"{calibration['recalibrated']['miscalibration_area']:.3f}")
    tmp, final = out / "model.partial", out / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    committee.save_pretrained(tmp, metrics={"test": _card_metrics(rows[-1].get("test") or _last_test(rows))}
                              if test else None,
                              description=f"A committee of {committee.config.size} models trained by `foundation "
                              f"learn` ({len(rows) - 1} iterations, {_labels(rows)} labels from "
                              f"{config.labeller.get('calculator')}){replayed(config)}; its calculator reports "
                              "energy_uncertainty, forces_uncertainty and max_devi_f.")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    report = {"iterations": rows, "labels_total": _labels(rows), "base_zero_shot": zero_shot,
              "calibration": calibration, "model": str(final), "converged": bool(rows[-1].get("converged")),
              "head": config.head or committee.config.heads[0],
              "replay": to_dict(config.replay) if config.replay is not None else None}
    write_json(out / "learn_report.json", report)
    plot_report(report, out / "learn_report.png")
    return report


def _labels(rows: list[dict]) -> int:
    return max((r.get("labels_total", 0) for r in rows), default=0)


def _last_test(rows: list[dict]) -> dict:
    return next((r["test"] for r in reversed(rows) if "test" in r), {})


def _card_metrics(test: dict) -> dict:
    return {k: v for k, v in test.items() if isinstance(v, float)}


def plot_report(report: dict, path: Path) -> Path:
    """Left: test force MAE (meV/Å) against labels, base zero-shot as a line. Right: accurate / candidate /
    failed fractions of each exploration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["iterations"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    tested = [r for r in rows if "test" in r]
    if tested:
        left.plot([r["labels_total"] for r in tested], [r["test"]["force_mae_meV_per_A"] for r in tested], "o-",
                  label="committee (loop)")
        if report.get("base_zero_shot"):
            left.axhline(report["base_zero_shot"]["force_mae_meV_per_A"], color="gray", ls="--", label="base")
        left.legend(fontsize=8)
    left.set(xlabel="labels", ylabel="test force MAE (meV/Å)", title="error vs labels")
    explored = [r for r in rows if "explored" in r]
    its = [r["iteration"] for r in explored]
    bottom = [0.0] * len(its)
    for name, color in (("accurate", "tab:green"), ("candidate", "tab:orange"), ("failed", "tab:red")):
        values = [r[f"{name}_fraction"] for r in explored]
        right.bar(its, values, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set(xlabel="iteration (exploration with the previous committee)", ylabel="fraction of frames",
              title="exploration")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
