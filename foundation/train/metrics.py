"""Validation metrics: MAE and RMSE per property, per dataset and per head, reducible over ranks.

Errors accumulate as sums (|e|, e², count) in one dense float64 tensor of shape (D, H, P, 3), so a single
all-reduce gives the exact global metrics whatever the split of structures over ranks. Properties and units:
energy_per_atom (eV/atom), energy (eV), forces (eV/Å, per component), stress (eV/Å³, per component),
charges (e), dipole (e·Å, per component). Labels a structure lacks (NaN) are skipped.
"""
from __future__ import annotations

import math

import numpy as np

import torch

from .. import keys
from .loss import _label_mask, structure_of_atom

PROPERTIES = ("energy_per_atom", keys.ENERGY, keys.FORCES, keys.STRESS, keys.CHARGES, keys.DIPOLE)
UNITS = {"energy_per_atom": "eV/atom", keys.ENERGY: "eV", keys.FORCES: "eV/Å", keys.STRESS: "eV/Å^3",
         keys.CHARGES: "e", keys.DIPOLE: "e*Å"}
_SOURCE = {"energy_per_atom": keys.ENERGY}


class MetricAccumulator:
    """Sums of absolute and squared errors per (dataset, head, property)."""

    def __init__(self, dataset_names: list[str], head_names: list[str]):
        self.dataset_names, self.head_names = list(dataset_names), list(head_names)
        self.sums = torch.zeros(len(self.dataset_names), len(self.head_names), len(PROPERTIES), 3,
                                dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: dict, batch) -> None:
        """Add the errors of one batch (predictions ``pred`` of the model on ``batch``)."""
        ds = batch[keys.DATASET].reshape(-1).cpu()
        head = batch[keys.HEAD].reshape(-1).cpu()
        atom_struct = structure_of_atom(batch).cpu()
        for p_index, prop in enumerate(PROPERTIES):
            key = _SOURCE.get(prop, prop)
            if key not in batch or key not in pred:
                continue
            ref = batch[key].detach().cpu().to(torch.float64)
            mask = _label_mask(ref)
            if not mask.any():
                continue
            diff = pred[key].detach().cpu().to(torch.float64).reshape(ref.shape)[mask] - ref[mask]
            if prop == "energy_per_atom":
                diff = diff / batch[keys.NATOMS].reshape(-1).cpu()[mask].to(torch.float64)
            struct = atom_struct[mask] if key in (keys.FORCES, keys.CHARGES) else torch.arange(ref.shape[0])[mask]
            diff = diff.reshape(diff.shape[0], -1)
            flat = (ds[struct] * len(self.head_names) + head[struct]) * len(PROPERTIES) + p_index
            stats = torch.stack([diff.abs().sum(1), (diff * diff).sum(1),
                                 torch.full((diff.shape[0],), float(diff.shape[1]), dtype=torch.float64)], dim=1)
            self.sums.view(-1, 3).index_add_(0, flat, stats)

    def reduce(self, all_reduce_sum) -> "MetricAccumulator":
        """Sum over ranks with ``all_reduce_sum(tensor) -> tensor`` (e.g. ``Engine.all_reduce_sum``)."""
        self.sums = all_reduce_sum(self.sums)
        return self

    def result(self) -> dict[str, dict[str, float]]:
        """{"dataset/head/property": {"mae", "rmse", "count"}} for every group with labels, plus
        "all/property" over all datasets and heads."""
        out = {}
        total = self.sums.sum(dim=(0, 1))
        for p_index, prop in enumerate(PROPERTIES):
            for d, dname in enumerate(self.dataset_names):
                for h, hname in enumerate(self.head_names):
                    entry = _entry(self.sums[d, h, p_index])
                    if entry:
                        out[f"{dname}/{hname}/{prop}"] = entry
            entry = _entry(total[p_index])
            if entry:
                out[f"all/{prop}"] = entry
        return out


def _entry(s: torch.Tensor) -> dict | None:
    count = float(s[2])
    if count == 0:
        return None
    return {"mae": float(s[0]) / count, "rmse": math.sqrt(float(s[1]) / count), "count": int(count)}


def flatten(result: dict, prefix: str = "valid") -> dict[str, float]:
    """{"valid/ds/head/forces_mae": value, ...} for CSV/TensorBoard rows."""
    return {f"{prefix}/{k}_{m}": v[m] for k, v in result.items() for m in ("mae", "rmse")}


_CARD_UNITS = {"energy_per_atom": "meV_per_atom", keys.ENERGY: "meV", keys.FORCES: "meV_per_A",
               keys.STRESS: "meV_per_A3", keys.CHARGES: "me", keys.DIPOLE: "me_A"}


def card_metrics(result: dict) -> dict[str, dict[str, float]]:
    """Metrics in the model-card form {dataset[/head]: {"forces_mae_meV_per_A": value, ...}} (x 1000)."""
    heads = {k.split("/")[1] for k in result if not k.startswith("all/")}
    out: dict = {}
    for name, v in result.items():
        if name.startswith("all/"):
            continue
        dataset, head, prop = name.split("/")
        group = out.setdefault(dataset if len(heads) == 1 else f"{dataset}/{head}", {})
        for m in ("mae", "rmse"):
            group[f"{prop}_{m}_{_CARD_UNITS[prop]}"] = 1000.0 * v[m]
    return out


def format_table(result: dict) -> str:
    """A plain-text table of the metrics (energies in meV/atom and meV, the rest in their units x 1000)."""
    lines = [f"{'group':40s} {'property':16s} {'MAE':>12s} {'RMSE':>12s} {'unit':>10s} {'count':>9s}"]
    for name, v in result.items():
        group, prop = name.rsplit("/", 1)
        unit = "m" + UNITS[prop]
        lines.append(f"{group:40s} {prop:16s} {1000 * v['mae']:12.4f} {1000 * v['rmse']:12.4f} {unit:>10s} "
                     f"{v['count']:9d}")
    return "\n".join(lines)


class RunLogger:
    """CSV (``train.csv``, ``valid.csv``), TensorBoard (``tb/``) and a progress bar, on rank 0 only.

    Floats are written with ``repr`` (exact round trip). On resume (``start_step`` > 0) rows after
    ``start_step`` are dropped first, so a resumed run's logs read as one uninterrupted run.
    A learning-curve PNG (``learning_curve.png``) is drawn on ``close()``.
    """

    def __init__(self, out_dir, active: bool, start_step: int, total: int, progress: bool = True):
        from pathlib import Path
        self.out, self.active = Path(out_dir), active
        self.files: dict = {}
        self.bar = self.tb = None
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("train", "valid"):
            self.files[name] = _CsvLog(self.out / f"{name}.csv", start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep training if a user removed it
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def train(self, step: int, row: dict, log: bool = True) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", atoms_s=f"{row['atoms_per_s']:.0f}", refresh=False)
        if log:
            self.files["train"].write({"step": step, **row})
            if self.tb is not None:
                for k, v in row.items():
                    self.tb.add_scalar(f"train/{k}", v, step)

    def valid(self, step: int, row: dict) -> None:
        if not self.active:
            return
        self.files["valid"].write({"step": step, **row})
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.write(f"step {step}: valid loss {row['valid/loss']:.6g}")

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        from .plots import learning_curve
        learning_curve(self.out / "train.csv", self.out / "valid.csv", self.out / "learning_curve.png")


class _CsvLog:
    """Append-only CSV with a header fixed by the first row (later unknown columns are dropped)."""

    def __init__(self, path, start_step: int):
        import csv
        self.path, self.header = path, None
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.header = reader.fieldnames
                rows = [r for r in reader if int(r["step"]) <= start_step]
        with open(path, "w", newline="") as f:
            if self.header:
                w = csv.DictWriter(f, self.header)
                w.writeheader()
                w.writerows(rows)

    def write(self, row: dict) -> None:
        import csv
        if self.header is None:
            self.header = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.header).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.header, extrasaction="ignore").writerow({k: _fmt(v) for k, v in row.items()})
            f.flush()


def _fmt(v):
    return repr(float(v)) if isinstance(v, float) else v


def read_csv(path) -> dict[str, np.ndarray]:
    """Columns of a log CSV as float arrays ({} when the file is missing or empty)."""
    import csv
    from pathlib import Path
    if not Path(path).is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}
