"""A small conservative pair potential with the ``FoundationModel`` forward/statistics/export interface.

Used by the training tests so they do not depend on the size of the real backbone:
E = sum_i E0[Z_i] + shift * n + scale * 1/2 sum_(i,j) phi(r_ij; Z_i, Z_j),  forces = -dE/dpos,
stress = (1/V) dE/dstrain (ASE sign), phi = MLP(Bessel basis(r)) x smooth cutoff, per species-pair gains.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from foundation import keys


class PairPotential(nn.Module):
    def __init__(self, elements: list[int], r_max: float = 4.0, num_basis: int = 6, hidden: int = 8):
        super().__init__()
        self.config = SimpleNamespace(elements=list(elements), r_max=float(r_max), num_basis=num_basis, hidden=hidden)
        index = torch.full((119,), -1, dtype=torch.long)
        index[torch.tensor(elements)] = torch.arange(len(elements))
        self.register_buffer("species_index", index)
        self.register_buffer("atomic_energies", torch.zeros(len(elements)))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))
        self.mlp = nn.Sequential(nn.Linear(num_basis, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        self.pair_gain = nn.Parameter(torch.ones(len(elements), len(elements)))

    def set_statistics(self, atomic_energies=None, scale=None, shift=None, avg_num_neighbors=None, head=None):
        with torch.no_grad():
            if atomic_energies:
                from ase.data import atomic_numbers
                for symbol, e in atomic_energies.items():  # {symbol: eV}, as FoundationModel.set_statistics
                    z = atomic_numbers[symbol]
                    if z in self.config.elements:
                        self.atomic_energies[self.species_index[z]] = float(e)
            if scale is not None:
                self.scale.fill_(float(scale))
            if shift is not None:
                self.shift.fill_(float(shift))

    def forward(self, batch, compute_forces: bool = True, compute_stress: bool = False, training: bool = True):
        dtype = self.pair_gain.dtype   # the model casts its inputs (training data arrive in float64, as stored)
        pos, cell = batch[keys.POSITIONS].to(dtype), batch[keys.CELL].to(dtype).view(-1, 3, 3)
        struct = getattr(batch, "batch", None)
        struct = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device) if struct is None else struct
        num_structures = cell.shape[0]
        send, recv = batch[keys.EDGE_INDEX]
        shifts = batch[keys.SHIFTS].to(dtype)
        if compute_forces:
            pos = pos.detach().requires_grad_(True)
        strain = torch.zeros(num_structures, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=compute_stress)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        pos_s = pos + torch.einsum("ni,nij->nj", pos, sym[struct])
        shifts_s = shifts + torch.einsum("ei,eij->ej", shifts, sym[struct[recv]])
        vec = pos_s[recv] - pos_s[send] + shifts_s
        r = vec.norm(dim=1)
        n = torch.arange(1, self.config.num_basis + 1, dtype=pos.dtype, device=pos.device)
        x = r.unsqueeze(1) / self.config.r_max
        basis = torch.sin(math.pi * n * x) / r.unsqueeze(1)
        cutoff = (1 - x.squeeze(1) ** 2) ** 2 * (x.squeeze(1) < 1)
        species = self.species_index[batch[keys.ATOMIC_NUMBERS]]
        phi = self.mlp(basis).squeeze(1) * cutoff * self.pair_gain[species[send], species[recv]]
        node = torch.zeros(pos.shape[0], dtype=pos.dtype, device=pos.device).index_add(0, recv, 0.5 * phi)
        node = self.scale * node + self.shift + self.atomic_energies[species]
        energy = torch.zeros(num_structures, dtype=pos.dtype, device=pos.device).index_add(0, struct, node)
        out = {keys.ENERGY: energy, keys.NODE_ENERGY: node}
        wrt = ([pos] if compute_forces else []) + ([strain] if compute_stress else [])
        if wrt:
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=training)
            if compute_forces:
                out[keys.FORCES] = -grads[0]
            if compute_stress:
                volume = torch.linalg.det(cell).abs().clamp(min=1e-12)
                out[keys.STRESS] = grads[-1] / volume.view(-1, 1, 1)
        return out

    # --- the HubMixin subset the trainer uses --------------------------------------------------------------
    def save_pretrained(self, directory, metrics=None, **kwargs):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({**vars(self.config), "metrics": metrics}))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        cfg.pop("metrics", None)
        model = cls(**cfg)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
