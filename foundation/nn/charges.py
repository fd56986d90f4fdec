"""``LongRangeHead``: latent charges from invariant node features and their electrostatic energy.

q_i = MLP(h_i) (C -> hidden -> 1, SiLU), then corrected to the total charge Q_s of each structure:
q_i <- q_i + (Q_s - sum_{j in s} q_j) / N_s, so sum_{i in s} q_i = Q_s exactly (to rounding).
The excess sum_{j in s} q_j - Q_s that the correction removes is an output (``keys.CHARGE_EXCESS``): the
uniform correction cannot tell which molecule of a structure should carry a charge, so two neutral molecules
whose raw charges sum to +d and -d stay a fake ion pair beyond the cutoff. A loss on the excess (no labels
needed beyond the total charge) teaches the raw charges of each training structure, isolated molecules
included, to sum to its charge by themselves; fragments then carry their own charge in a larger structure.
Energy from ``foundation.nn.electrostatics`` (erf-damped Coulomb for molecules, latent Ewald for periodic
cells, PME for periodic cells with at least ``pme_threshold`` atoms). Trains from energies and forces alone;
the charges and dipole it returns can carry light auxiliary losses.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import keys
from . import electrostatics

KINDS = ("latent_ewald", "coulomb")

DEFAULTS: dict[str, Any] = {
    "kind": "latent_ewald",     # "latent_ewald": molecules + periodic cells; "coulomb": molecules only
    "sigma": 1.0,               # Å, Gaussian smearing of the charges (erf(r / (sqrt(2) sigma)) / r)
    "kcut": None,               # 1/Å, k-space cutoff; None -> 6 / sigma (weight at the cutoff exp(-18) ~ 1.5e-8:
                                # with 5 / sigma, k-vectors crossing the sphere under strain broke
                                # stress-vs-finite-strain at 1e-5)
    "pme_threshold": 1000,      # atoms; periodic structures this large use PME; None -> always Ewald
    "mesh_spacing": None,       # Å, PME mesh spacing; None -> min(sigma / 2, 0.9 pi / kcut)
    "interpolation_nodes": 7,   # PME interpolation nodes per axis, 3..7 (7: ~1e-7 relative error)
    "hidden": 16,               # hidden width of the charge MLP
}


def long_range_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a long-range config dict and fill defaults; ValueError naming the bad key and what is allowed."""
    config = dict(config or {})
    unknown = [k for k in config if k not in DEFAULTS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(DEFAULTS), n=1) for k in unknown}
        hint = "; ".join(f"{k!r} (did you mean {m[0]!r}?)" if m else repr(k) for k, m in hints.items())
        raise ValueError(f"long_range config has unknown keys {hint}; allowed keys: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **config}
    _require(out["kind"] in KINDS, f"long_range kind must be one of {KINDS}, got {out['kind']!r}")
    _require(_positive(out["sigma"]), f"long_range sigma must be a positive length in Å, got {out['sigma']!r}")
    out["sigma"] = float(out["sigma"])
    if out["kcut"] is None:
        out["kcut"] = 6.0 / out["sigma"]
    _require(_positive(out["kcut"]), f"long_range kcut must be a positive wave number in 1/Å, got {out['kcut']!r}")
    out["kcut"] = float(out["kcut"])
    threshold = out["pme_threshold"]
    _require(threshold is None or (isinstance(threshold, int) and not isinstance(threshold, bool) and threshold >= 1),
             f"long_range pme_threshold must be a positive number of atoms or None (never PME), got {threshold!r}")
    if out["mesh_spacing"] is None:
        out["mesh_spacing"] = electrostatics.default_mesh_spacing(out["sigma"], out["kcut"])
    _require(_positive(out["mesh_spacing"]) and out["mesh_spacing"] < math.pi / out["kcut"],
             f"long_range mesh_spacing must be a positive length below pi / kcut = {math.pi / out['kcut']:.4f} Å "
             f"(the mesh must hold every |k| <= kcut), got {out['mesh_spacing']!r}")
    out["mesh_spacing"] = float(out["mesh_spacing"])
    _require(out["interpolation_nodes"] in (3, 4, 5, 6, 7),
             f"long_range interpolation_nodes must be 3..7, got {out['interpolation_nodes']!r}")
    hidden = out["hidden"]
    _require(isinstance(hidden, int) and not isinstance(hidden, bool) and hidden >= 1,
             f"long_range hidden must be a positive integer (width of the charge MLP), got {hidden!r}")
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def constrain_total_charge(raw: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                           total_charge: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """raw (n,) e -> (charges (n,) e with sum over each structure equal to total_charge (B,) e (None -> 0),
    excess (B,) e = sum of the raw charges - total_charge, the amount the correction removed)."""
    counts = torch.bincount(batch, minlength=num_graphs).to(raw.dtype)
    sums = torch.zeros(num_graphs, dtype=raw.dtype, device=raw.device).index_add(0, batch, raw)
    target = torch.zeros_like(sums) if total_charge is None else total_charge.reshape(num_graphs).to(raw.dtype)
    if bool(torch.isnan(target).any()):
        raise ValueError("total_charge contains NaN (a structure without a total-charge label); give every "
                         "structure its total charge in e (0 for neutral) before the long-range head")
    correction = (target - sums) / counts.clamp(min=1)
    return raw + correction[batch], sums - target


class LongRangeHead(nn.Module):
    """Latent charges and their electrostatic energy. ``LongRangeHead(num_features, config, dtype)``.

    num_features: C, the width of the invariant (scalar) node features; config: see ``DEFAULTS``
    (validated by ``long_range_config``).
    """

    def __init__(self, num_features: int, config: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        _require(isinstance(num_features, int) and num_features >= 1,
                 f"num_features must be a positive integer (node feature width), got {num_features!r}")
        self.config = long_range_config(config)
        hidden = self.config["hidden"]
        self.charge_mlp = nn.Sequential(nn.Linear(num_features, hidden, dtype=dtype), nn.SiLU(),
                                        nn.Linear(hidden, 1, dtype=dtype))

    def charges(self, node_features: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                total_charge: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """node_features (n,C) invariant -> (latent charges (n,) e summing to total_charge (B,) per structure,
        excess (B,) e of the raw charges over total_charge; see ``constrain_total_charge``)."""
        if node_features.dim() != 2 or node_features.shape[1] != self.charge_mlp[0].in_features:
            raise ValueError(f"node_features must have shape (n, {self.charge_mlp[0].in_features}) (invariant "
                             f"features), got {tuple(node_features.shape)}")
        raw = self.charge_mlp(node_features).squeeze(-1)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))  # bf16 autocast: constrain in float32
        return constrain_total_charge(raw, batch, num_graphs, total_charge)

    def forward(self, node_features: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                cell: torch.Tensor, pbc: torch.Tensor, total_charge: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Energy, charges and dipole of a batch.

        node_features (n,C); pos (n,3) Å and cell (B,3,3) Å, strained (``electrostatics.strained_cell``) when
        stress is wanted; batch (n,); pbc (B,3) bool; total_charge (B,) e or None (neutral).
        Returns {ENERGY: (B,) eV, NODE_ENERGY: (n,) eV (per-atom shares, summing to ENERGY), CHARGES: (n,) e,
        DIPOLE: (B,3) e·Å = sum_i q_i r_i about the origin, CHARGE_EXCESS: (B,) e}. For
        periodic structures the dipole is that of the atoms at the positions given (it depends on how they
        are wrapped, it is not a polarisation): put dipole losses on molecules only.
        """
        cfg = self.config
        q, excess = self.charges(node_features, batch, num_graphs, total_charge)
        atom_energy = electrostatics.electrostatic_atom_energies(
            q, pos, cell, pbc, batch, num_graphs, sigma=cfg["sigma"], kcut=cfg["kcut"],
            pme_threshold=cfg["pme_threshold"], mesh_spacing=cfg["mesh_spacing"],
            interpolation_nodes=cfg["interpolation_nodes"], periodic_allowed=cfg["kind"] == "latent_ewald")
        dipole = torch.zeros(num_graphs, 3, dtype=q.dtype, device=q.device).index_add(
            0, batch, q.unsqueeze(1) * pos.to(q.dtype))
        energy = electrostatics.structure_sum(atom_energy, batch, num_graphs)
        return {keys.ENERGY: energy, keys.NODE_ENERGY: atom_energy, keys.CHARGES: q, keys.DIPOLE: dipole,
                keys.CHARGE_EXCESS: excess}
