"""Per-head energy statistics and the assembly of per-atom energies.

  e_i = E0[h, z_i] + scale[h] * (R_i - (1 - tanh(N_i)) R_iso[h, z_i]) + shift[h] * tanh(N_i)

R_i is the sum of the layer readouts of atom i for its structure's head h; R_iso[h, z] is the same sum for an
atom of element z with no neighbours (MACE's skip connections make it non-zero). N_i = sum_j f_cut(r_ij) is the
smooth neighbour count (0 when isolated, >> 1 in condensed phases, continuous with two derivatives at r_max).
An isolated atom (N = 0) therefore gets exactly E0, while with neighbours (tanh(N) -> 1) the model is MACE's
ScaleShiftMACE: the subtraction fades out, so the embedding -> skip -> readout route can still learn a
per-element constant. (Subtracting R_iso everywhere removed that route and left a slowly-learned constant energy
offset: rMD17 ethanol, 3 epochs, energy MAE 121.6 -> 7.0 meV/atom with the fade, forces unchanged.)
Statistics live in the config; the buffers here are non-persistent copies rebuilt from it. E0 is kept in float64
whatever the model's dtype (``HeadStatistics._apply`` re-casts it after ``model.float()``/``.to()``): the model
computes the residual e_i - E0[h, z_i] in its own dtype and adds the E0 sum in float64 at the output, so a total
energy of -17617.709862891 eV is not rounded to float32's 2 meV spacing there (docs/precision.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .config import ModelConfig


class HeadStatistics(nn.Module):
    """Buffers e0 (H, N_el) eV (always float64), scale (H,), shift (H,) eV (model dtype), built from ``config``
    (not saved in the state dict)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("e0", torch.zeros(len(config.heads), len(config.elements), dtype=torch.float64),
                             persistent=False)
        self.register_buffer("scale", torch.ones(len(config.heads), dtype=dtype), persistent=False)
        self.register_buffer("shift", torch.zeros(len(config.heads), dtype=dtype), persistent=False)
        self.load_config(config)

    def _apply(self, fn, recurse=True):
        """``.to()``/``.float()``/``.cuda()`` move e0 but keep its float64 values (added in float64 at the output)."""
        e0 = self.e0
        super()._apply(fn, recurse)
        self.e0 = e0.to(device=self.e0.device)
        return self

    @torch.no_grad()
    def load_config(self, config: ModelConfig) -> None:
        """Copy the config's statistics into the buffers (keeping their device and dtype)."""
        for k, head in enumerate(config.heads):
            self.e0[k] = torch.tensor(config.atomic_energies[head], dtype=self.e0.dtype)
            self.scale[k] = config.scale[head]
            self.shift[k] = config.shift[head]

    def node_energies(self, head: torch.Tensor, readout: torch.Tensor, readout_iso: torch.Tensor,
                      coordination: torch.Tensor) -> torch.Tensor:
        """head (n,), readout (n,) and readout_iso (n,) summed readouts of the atom's head, coordination (n,)
        smooth neighbour count -> per-atom energies without E0 (n,) eV, in the readouts' dtype."""
        presence = torch.tanh(coordination)
        return self.scale[head] * (readout - (1.0 - presence) * readout_iso) + self.shift[head] * presence

    def reference(self, z: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """z (n,) element index, head (n,) -> E0[head, z] (n,) eV, float64."""
        return self.e0[head, z]


    def mace_node_energies(self, head: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """mace-torch's assembly (``energy_form="mace"``) without E0 (added in float64 at the output, as for the
        default form): scale[h] * readout_i + shift[h] (n,) eV for every atom, isolated or not; readout (n,)
        includes a pair repulsion when there is one."""
        return self.scale[head] * readout + self.shift[head]


def update_statistics(config: ModelConfig, head: str | None,
                      atomic_energies: Mapping[str, float] | Sequence[float] | None,
                      scale: float | None, shift: float | None, avg_num_neighbors: float | None) -> None:
    """Write new statistics for one head (or every head when ``head`` is None) into ``config`` and validate.

    atomic_energies: {symbol: eV} (every model element) or a list in ``config.elements`` order.
    """
    heads = config.heads if head is None else [config.heads[config.head_index(head)]]
    if atomic_energies is not None:
        if isinstance(atomic_energies, Mapping):
            missing = [s for s in config.elements if s not in atomic_energies]
            if missing:
                raise ValueError(f"atomic_energies has no value for elements {missing}; give one per model element "
                                 f"{config.elements}")
            values = [float(atomic_energies[s]) for s in config.elements]
        else:
            values = [float(v) for v in atomic_energies]
            if len(values) != len(config.elements):
                raise ValueError(f"atomic_energies has {len(values)} values; the model has {len(config.elements)} "
                                 f"elements {config.elements}")
        for h in heads:
            config.atomic_energies[h] = list(values)
    for name, value in (("scale", scale), ("shift", shift)):
        if value is not None:
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value!r}")
            for h in heads:
                getattr(config, name)[h] = float(value)
    if avg_num_neighbors is not None:
        config.avg_num_neighbors = float(avg_num_neighbors)
    config.validate()
