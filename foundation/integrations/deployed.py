"""``DeployedModel``: the scriptable top level of the artifact, a dict of tensors in, a dict of tensors out.

Inputs (names of ``foundation.keys``, ASE units): ``pos`` (n,3) Å, ``atomic_numbers`` (n,) int, ``edge_index``
(2,E) int [sender; receiver], ``shifts`` (E,3) Å with r = pos[receiver] - pos[sender] + shifts, and optionally
``cell`` (B,3,3) Å (rows = lattice vectors; default zeros, B = 1), ``pbc`` (B,3) bool (default False), ``batch`` (n,)
int (default all 0) and ``total_charge`` (B,) e (required when the model embeds the total charge, else default 0).
Outputs: ``energy`` (B,) eV, ``energies`` (n,) eV per atom, ``forces`` (n,3) eV/Å and, while the attribute
``compute_stress`` is True (the default), ``stress`` (B,3,3) eV/Å³ (ASE sign) and ``virials`` (B,3,3) eV = -stress V.
Structures without a periodic direction get zero stress and virials (as in a batched ``FoundationModel`` call).
"""

import torch
from torch import Tensor, nn

from ..model.backbone import FoundationModel
from .scripted import ShortRange
from .scripted_lr import ScriptLongRange


class DeployedModel(nn.Module):
    """``DeployedModel(model, head_index, dtype)``: one head of ``model`` as a TorchScript-ready module."""

    def __init__(self, model: FoundationModel, head_index: int):
        super().__init__()
        cfg = model.config
        self.short_range = ShortRange(model, head_index)
        self.has_long_range = model.long_range is not None
        self.long_range = ScriptLongRange(model.long_range) if model.long_range is not None else None
        self.embeds_charge = cfg.max_total_charge > 0
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(cfg.atomic_numbers)] = torch.arange(len(cfg.elements))
        self.register_buffer("element_index", table)
        self.atomic_numbers: list[int] = list(cfg.atomic_numbers)
        self.r_max = float(cfg.r_max)
        self.num_layers = int(cfg.num_layers)
        self.compute_stress = True
        self.dtype_name = cfg.dtype

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        for name in ["pos", "atomic_numbers", "edge_index", "shifts"]:
            if name not in inputs:
                raise ValueError("artifact input has no '" + name + "'; give pos (n,3), atomic_numbers (n,), "
                                 "edge_index (2,E) and shifts (E,3) (plus cell, pbc, batch, total_charge)")
        dtype = self.short_range.embedding.dtype
        pos = inputs["pos"].to(dtype).detach().requires_grad_(True)
        n = pos.shape[0]
        z = self.elements(inputs["atomic_numbers"], pos)
        cell = inputs["cell"].to(dtype).reshape(-1, 3, 3) if "cell" in inputs else pos.new_zeros(1, 3, 3)
        num_graphs = cell.shape[0]
        pbc = inputs["pbc"].reshape(-1, 3).to(torch.bool) if "pbc" in inputs \
            else torch.zeros(num_graphs, 3, dtype=torch.bool, device=pos.device)
        batch = inputs["batch"].long() if "batch" in inputs else torch.zeros(n, dtype=torch.long, device=pos.device)
        charge = self.total_charge(inputs, num_graphs, dtype)
        edge_index = inputs["edge_index"].long()
        sender, receiver = edge_index[0], edge_index[1]
        self.check(pos, cell, pbc, batch, edge_index, inputs["shifts"].shape[0])
        shifts = inputs["shifts"].to(dtype)
        displacement = torch.zeros(num_graphs, 3, 3, dtype=dtype, device=pos.device)
        pos_s, cell_s = pos, cell
        if self.compute_stress:
            displacement.requires_grad_(True)
            sym = 0.5 * (displacement + displacement.transpose(1, 2))
            pos_s = pos + torch.einsum("ni,nij->nj", pos, sym[batch])
            shifts = shifts + torch.einsum("ei,eij->ej", shifts, sym[batch[sender]])
            cell_s = cell + torch.bmm(cell, sym)
        vectors = pos_s[receiver] - pos_s[sender] + shifts
        node_energy, features = self.short_range(z, vectors, sender, receiver, charge[batch])
        periodic = pbc.any(dim=1)
        long_range = self.long_range
        if long_range is not None:
            node_energy = node_energy + long_range(features, pos_s, cell_s, periodic, batch, charge)
        energy = torch.zeros(num_graphs, dtype=dtype, device=pos.device).index_add(0, batch, node_energy)
        out = {"energy": energy.detach(), "energies": node_energy.detach()}
        inputs_grad = [pos, displacement] if self.compute_stress else [pos]
        grads = torch.autograd.grad([energy.sum()], inputs_grad, allow_unused=True)
        out["forces"] = _negated_or_zeros(grads[0], pos)
        if self.compute_stress:
            d_e = -_negated_or_zeros(grads[1], displacement)
            volume = torch.linalg.det(cell).abs()
            mask = (periodic & (volume > 1e-8)).to(dtype).view(-1, 1, 1)
            safe = torch.where(volume > 1e-8, volume, torch.ones_like(volume))
            out["stress"] = d_e / safe.view(-1, 1, 1) * mask
            out["virials"] = -d_e * mask
        return out

    def elements(self, numbers: Tensor, pos: Tensor) -> Tensor:
        """atomic numbers (n,) -> element index (n,); errors for NaN positions and elements outside the model."""
        if not bool(torch.isfinite(pos).all()):
            bad = _ints(torch.nonzero(~torch.isfinite(pos).all(dim=1)).flatten())
            raise ValueError("artifact input 'pos' has NaN or infinite coordinates for atoms " + str(bad))
        numbers = numbers.long()
        if numbers.numel() > 0 and (int(numbers.min()) < 0 or int(numbers.max()) > 118):
            raise ValueError("artifact input 'atomic_numbers' has values outside 0..118: "
                             + str(_ints(torch.unique(numbers))))
        z = self.element_index[numbers]
        if bool((z < 0).any()):
            raise ValueError("atomic numbers " + str(_ints(torch.unique(numbers[z < 0]))) + " are not elements "
                             "of this model; it covers atomic numbers " + str(self.atomic_numbers))
        return z

    def total_charge(self, inputs: dict[str, Tensor], num_graphs: int, dtype: torch.dtype) -> Tensor:
        """(B,) e from inputs['total_charge']; required when the model embeds it."""
        if "total_charge" not in inputs:
            if self.embeds_charge:
                raise ValueError("this model embeds the total charge: give inputs['total_charge'] (B,) in e "
                                 "(0 for neutral structures)")
            return torch.zeros(num_graphs, dtype=dtype, device=inputs["pos"].device)
        charge = inputs["total_charge"].to(dtype).reshape(-1)
        if charge.shape[0] != num_graphs or not bool(torch.isfinite(charge).all()):
            raise ValueError("artifact input 'total_charge' must hold one finite charge (e) per structure, "
                             + str(num_graphs) + " values")
        return charge

    def check(self, pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, edge_index: Tensor, num_shifts: int):
        """Shapes and consistency; a periodic structure needs a cell of nonzero volume."""
        n, num_graphs = pos.shape[0], cell.shape[0]
        if pbc.shape[0] != num_graphs or batch.shape[0] != n:
            raise ValueError("artifact inputs disagree: cell (B,3,3) and pbc (B,3) need the same B, batch needs "
                             "one entry per atom")
        if n > 0 and (int(batch.min()) < 0 or int(batch.max()) >= num_graphs):
            raise ValueError("artifact input 'batch' has structure indices outside 0.." + str(num_graphs - 1))
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.shape[1] != num_shifts:
            raise ValueError("artifact input 'edge_index' must be (2,E) with one row of 'shifts' (E,3) per edge")
        if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
            raise ValueError("artifact input 'edge_index' refers to atoms outside 0.." + str(n - 1))
        flat = pbc.any(dim=1) & (torch.linalg.det(cell).abs() <= 1e-6)
        if bool(flat.any()):
            raise ValueError("structures " + str(_ints(torch.nonzero(flat).flatten())) + " are periodic but "
                             "their cell has zero volume; give a full 3x3 cell (rows = lattice vectors, Å) or "
                             "set pbc to False")

    @torch.jit.export
    def pair_forces(self, atomic_numbers: Tensor, vectors: Tensor, sender: Tensor, receiver: Tensor,
                    num_local: int) -> tuple[Tensor, Tensor]:
        """For LAMMPS: nodes = local atoms then ghosts, edge vectors (E,3) Å = pos[receiver] - pos[sender].

        Returns (energies (num_local,) eV of the local atoms, dE/dvectors (E,3) eV/Å of their summed energy).
        Short-range models only (the long-range head needs the whole periodic structure).
        """
        if self.long_range is not None:
            raise ValueError("the long-range head needs the whole periodic structure: LAMMPS' pair-wise "
                             "coupling is for short-range models only")
        dtype = self.short_range.embedding.dtype
        vec = vectors.to(dtype).detach().requires_grad_(True)
        z = self.elements(atomic_numbers, vec)
        charge = torch.zeros(z.shape[0], dtype=dtype, device=vec.device)
        node_energy, _ = self.short_range(z, vec, sender.long(), receiver.long(), charge)
        local = node_energy[:num_local]
        grad: list[Tensor | None] = torch.autograd.grad([local.sum()], [vec], allow_unused=True)
        return local.detach(), -_negated_or_zeros(grad[0], vec)


def _negated_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """-grad, or zeros shaped like ``like`` when the output does not depend on it."""
    if grad is None:
        return torch.zeros_like(like)
    return -grad


def _ints(values: Tensor) -> list[int]:
    """A 1-d integer tensor as a list (for error messages)."""
    out: list[int] = values.long().tolist()
    return out
