"""TorchScript-compatible long-range head: latent charges, erf-Coulomb for molecules, latent Ewald for cells.

The same formulas as ``foundation.nn.charges`` and ``foundation.nn.electrostatics`` (see there), one periodic
structure at a time. PME is not part of the artifact (torch-pme's calculator with the truncated kernel is not
scripted here): a periodic structure with at least ``pme_threshold`` atoms, which the Python model would send to
PME, is an error that says so. K = ``COULOMB_CONSTANT`` eV·Å/e².
"""
import math

import torch
from torch import Tensor, nn

from ..nn.electrostatics import COULOMB_CONSTANT


class ScriptLongRange(nn.Module):
    """Per-atom electrostatic energies (n,) eV from invariant features (n, C) and (strained) positions and cells."""

    def __init__(self, head):
        super().__init__()
        cfg = head.config
        self.charge_mlp = _copy_mlp(head.charge_mlp)
        self.coulomb_constant = float(COULOMB_CONSTANT)
        self.sigma, self.kcut = float(cfg["sigma"]), float(cfg["kcut"])
        self.periodic_allowed = cfg["kind"] == "latent_ewald"
        self.pme_threshold = int(cfg["pme_threshold"]) if cfg["pme_threshold"] is not None else -1

    def forward(self, features: Tensor, pos: Tensor, cell: Tensor, periodic: Tensor, batch: Tensor,
                total_charge: Tensor) -> Tensor:
        """features (n,C), pos (n,3) Å, cell (B,3,3) Å, periodic (B,) bool, batch (n,), total_charge (B,) e."""
        num_graphs = cell.shape[0]
        raw = self.charge_mlp(features).squeeze(-1)
        counts = torch.bincount(batch, minlength=num_graphs)
        sums = torch.zeros(num_graphs, dtype=raw.dtype, device=raw.device).index_add(0, batch, raw)
        q = raw + ((total_charge - sums) / counts.clamp(min=1).to(raw.dtype))[batch]
        energy = torch.zeros_like(q)
        for s in range(num_graphs):
            atoms = torch.nonzero(batch == s).flatten()
            if atoms.numel() == 0:
                continue
            if bool(periodic[s]):
                if not self.periodic_allowed:
                    raise ValueError("structure " + str(s) + " is periodic, but this model's long-range head "
                                     "(kind 'coulomb') only handles molecules; set its pbc to False")
                if self.pme_threshold > 0 and atoms.numel() >= self.pme_threshold:
                    raise ValueError("structure " + str(s) + " has " + str(atoms.numel()) + " atoms: the Python "
                                     "model uses PME from " + str(self.pme_threshold) + " atoms, which the "
                                     "TorchScript artifact does not contain; use the Python model, or export a "
                                     "model with long_range pme_threshold None (Ewald for every cell)")
                e_s = self.ewald(q[atoms], pos[atoms], cell[s])
            else:
                e_s = self.coulomb(q[atoms], pos[atoms])
            energy = energy.index_put([atoms], e_s)
        return energy

    def coulomb(self, q: Tensor, r: Tensor) -> Tensor:
        """Erf-damped Coulomb of one molecule, each pair's energy split between its atoms: (n,) eV."""
        n = q.shape[0]
        idx = torch.triu_indices(n, n, 1, device=q.device)
        i, j = idx[0], idx[1]
        dist = torch.linalg.norm(r[j] - r[i], dim=-1)
        half = 0.5 * self.coulomb_constant * q[i] * q[j] * torch.erf(dist / (math.sqrt(2.0) * self.sigma)) / dist
        return torch.zeros_like(q).index_add(0, i, half).index_add(0, j, half)

    def ewald(self, q: Tensor, r: Tensor, cell: Tensor) -> Tensor:
        """Latent Ewald (k-space only, |k| <= kcut, k = 0 dropped) of one cell (3,3) Å, per atom: (n,) eV."""
        volume = torch.linalg.det(cell).abs()
        reciprocal = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)
        lengths = torch.linalg.norm(cell.detach(), dim=1)
        nmax: list[int] = torch.floor(self.kcut * lengths / (2.0 * math.pi)).long().tolist()
        axes = [torch.arange(-m, m + 1, device=cell.device, dtype=cell.dtype) for m in nmax]
        grid = torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij")
        n = torch.stack([grid[0], grid[1], grid[2]], dim=-1).reshape(-1, 3)
        half = (n[:, 0] > 0) | ((n[:, 0] == 0) & (n[:, 1] > 0)) | ((n[:, 0] == 0) & (n[:, 1] == 0) & (n[:, 2] > 0))
        n = n[half]
        keep = ((n @ reciprocal.detach()) ** 2).sum(-1) <= self.kcut * self.kcut
        k = n[keep] @ reciprocal
        k_sq = (k ** 2).sum(-1)
        weight = torch.exp(-0.5 * self.sigma * self.sigma * k_sq) / k_sq
        phase = r @ k.transpose(0, 1)  # (n, K)
        cos, sin = torch.cos(phase), torch.sin(phase)
        s_re, s_im = q @ cos, q @ sin
        per_atom = 2.0 * q * (cos @ (weight * s_re)) + 2.0 * q * (sin @ (weight * s_im))
        per_atom = self.coulomb_constant * 2.0 * math.pi / volume * per_atom
        return per_atom - self.coulomb_constant * q * q / (math.sqrt(2.0 * math.pi) * self.sigma)


def _copy_mlp(mlp: nn.Sequential) -> nn.Sequential:
    """A detached copy of the charge MLP (Linear, SiLU, Linear) in its dtype."""
    first, last = mlp[0], mlp[2]
    out = nn.Sequential(nn.Linear(first.in_features, first.out_features, dtype=first.weight.dtype), nn.SiLU(),
                        nn.Linear(last.in_features, last.out_features, dtype=last.weight.dtype))
    out.load_state_dict(mlp.state_dict())
    return out.requires_grad_(False)
