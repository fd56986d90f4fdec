"""Validation metrics: MAE and RMSE per property, per dataset and per head, reducible over ranks.

Errors accumulate as sums (|e|, e², count) in one dense float64 tensor of shape (D, H, P, 3), so a single
all-reduce gives the exact global metrics whatever the split of structures over ranks. Properties and units:
energy_per_atom (eV/atom), energy (eV), forces (eV/Å, per component), stress (eV/Å³, per component),
charges (e), dipole (e·Å, per component). Labels a structure lacks (NaN) are skipped.
"""
from __future__ import annotations

import math

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

    def reduce(self, all_reduce_sum) -> MetricAccumulator:
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
               keys.STRESS: "meV_per_A3", keys.CHARGES: "me", keys.DIPOLE: "me_A",
               keys.HESSIAN_PRODUCTS: "meV_per_A2"}


def card_entry(prop: str, metric: str, value: float) -> tuple[str, float]:
    """One model-card number: (``"{prop}_{metric}_{unit}"``, value x 1000), from ``value`` in eV-based units
    (eV/atom, eV/Å, ...) to the card's meV-based ones. Every card (training, fine-tuning, distillation) uses it."""
    return f"{prop}_{metric}_{_CARD_UNITS[prop]}", 1000.0 * float(value)


def card_metrics(result: dict) -> dict[str, dict[str, float]]:
    """Metrics in the model-card form {dataset[/head]: {"forces_mae_meV_per_A": value, ...}} (x 1000)."""
    heads = {k.split("/")[1] for k in result if not k.startswith("all/")}
    out: dict = {}
    for name, v in result.items():
        if name.startswith("all/"):
            continue
        dataset, head, prop = name.split("/")
        group = out.setdefault(dataset if len(heads) == 1 else f"{dataset}/{head}", {})
        group.update(card_entry(prop, m, v[m]) for m in ("mae", "rmse"))
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
