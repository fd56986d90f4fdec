"""Conservative forces, stress via the strain derivative, and Hessian-vector products, all by autograd.

Strain trick (MACE's ``get_symmetric_displacement``): a symmetric strain S = (D + D^T)/2 per structure, D = 0
with requires_grad, deforms positions pos' = pos + pos @ S and periodic shifts' = shifts + shifts @ S (since
shifts = unit_shifts @ cell and cell' = cell + cell @ S). Then forces = -dE/dpos, virials = -dE/dD and
stress = (dE/dD) / V with V = |det cell| (unstrained volume), the ASE sign (positive = tensile), eV/Å³.
"""
from __future__ import annotations

import torch


def apply_strain(pos: torch.Tensor, shifts: torch.Tensor, batch: torch.Tensor, sender: torch.Tensor,
                 num_graphs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pos (n,3) Å, shifts (E,3) Å, batch (n,), sender (E,) -> (displacement D (B,3,3), pos', shifts')."""
    displacement = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    sym = 0.5 * (displacement + displacement.transpose(1, 2))
    pos_s = pos + torch.einsum("ni,nij->nj", pos, sym[batch])
    shifts_s = shifts + torch.einsum("ei,eij->ej", shifts, sym[batch[sender]])
    return displacement, pos_s, shifts_s


def forces_and_stress(energy: torch.Tensor, pos: torch.Tensor, displacement: torch.Tensor | None,
                      cell: torch.Tensor, pbc: torch.Tensor, create_graph: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """energy (B,) eV -> forces (n,3) eV/Å, stress (B,3,3) eV/Å³ and virials (B,3,3) eV (None without strain).

    Structures without a periodic direction or with a zero-volume cell get zero stress and virials.
    """
    inputs = [pos] if displacement is None else [pos, displacement]
    grads = torch.autograd.grad([energy.sum()], inputs, create_graph=create_graph, retain_graph=create_graph,
                                allow_unused=True)
    forces = -grads[0] if grads[0] is not None else torch.zeros_like(pos)
    if displacement is None:
        return forces, None, None
    d_e = grads[1] if grads[1] is not None else torch.zeros_like(displacement)
    volume = torch.linalg.det(cell).abs()
    periodic = pbc.any(dim=1) & (volume > 1e-8)
    safe = torch.where(periodic, volume, torch.ones_like(volume))
    mask = periodic.to(d_e.dtype).view(-1, 1, 1)
    stress = d_e / safe.view(-1, 1, 1) * mask
    virials = -d_e * mask
    return forces, stress, virials


def hessian_vector_product(energy: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor,
                           create_graph: bool) -> torch.Tensor:
    """H v with H = d^2 E / dpos^2 (eV/Å²): energy (B,), pos (n,3), vectors (n,3) or (n,3,k) -> same shape as v.

    Double backward: grad of (dE/dpos . v) with respect to pos, for each of the k vectors.
    """
    grad = torch.autograd.grad([energy.sum()], [pos], create_graph=True)[0]
    vs = vectors.unsqueeze(-1) if vectors.dim() == 2 else vectors
    out = []
    for k in range(vs.shape[-1]):
        retain = create_graph or k < vs.shape[-1] - 1
        hv = torch.autograd.grad([(grad * vs[..., k]).sum()], [pos], create_graph=create_graph,
                                 retain_graph=retain, allow_unused=True)[0]
        out.append(hv if hv is not None else torch.zeros_like(pos))
    result = torch.stack(out, dim=-1)
    return result.squeeze(-1) if vectors.dim() == 2 else result
