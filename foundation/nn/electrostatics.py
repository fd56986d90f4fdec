"""Electrostatics of (latent) charges on batched tensors: erf-damped Coulomb, latent Ewald, PME.

Every charge is a Gaussian-smeared point charge of width ``sigma`` (Å): the pair interaction is
K q_i q_j erf(r / (sqrt(2) sigma)) / r with K = ``COULOMB_CONSTANT`` (eV·Å/e², ASE's Hartree·Bohr).

- molecules (no periodic direction): E = K sum_{i<j} q_i q_j erf(r_ij / (sqrt(2) sigma)) / r_ij
- periodic cells (latent Ewald summation, Cheng 2025):
  E = K (2 pi / V) sum_{0<|k|<=kcut} exp(-sigma^2 k^2 / 2) / k^2 |S(k)|^2 - K sum_i q_i^2 / (sqrt(2 pi) sigma),
  S(k) = sum_i q_i exp(i k.r_i), k = n @ (2 pi cell^-T) for integer n. The k = 0 term is dropped (a charged
  cell sits in a uniform neutralising background; no further background term is added).
- large periodic cells: the same truncated sum by smooth particle-mesh Ewald (torch-pme), O(n log n).

A structure with any periodic direction is treated as periodic in 3D with its cell (slabs need a vacuum
gap in the cell). Everything is differentiable with respect to positions, charges and the cell (the
k-vectors depend on the cell), so forces and stress follow by autograd through the strain: pass positions
and cell strained as in ``foundation.model.derivatives.apply_strain`` (``strained_cell`` below).
bf16/fp16 inputs are computed in float32; outputs have the (promoted) compute dtype.
"""
from __future__ import annotations

import functools
import math

import torch
from ase import units

COULOMB_CONSTANT = units.Hartree * units.Bohr  # eV·Å / e², 14.399645...


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def _full_precision(fn):
    """Run ``fn`` with autocast disabled (bf16 phases k.r and FFTs are useless); inputs are upcast instead."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device_type=device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def strained_cell(cell: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """cell (B,3,3) Å, displacement D (B,3,3) -> cell + cell @ (D + D^T)/2, as ``apply_strain`` does to shifts."""
    sym = 0.5 * (displacement + displacement.transpose(1, 2))
    return cell + torch.bmm(cell, sym)


# --- molecules -------------------------------------------------------------------------------------------
def _pairs_within(batch: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All unordered pairs (i < j in structure order) of atoms in the same structure: two (P,) index tensors."""
    n = batch.numel()
    order = torch.argsort(batch, stable=True)
    b = batch[order]
    counts = torch.bincount(b, minlength=num_graphs)
    end = torch.cumsum(counts, 0)
    slot = torch.arange(n, device=batch.device)
    partners = end[b] - slot - 1  # atoms after this one in its structure
    first = slot.repeat_interleave(partners)
    start = torch.cumsum(partners, 0) - partners
    offset = torch.arange(first.numel(), device=batch.device) - start[first]
    second = first + 1 + offset
    return order[first], order[second]


def structure_sum(atom_energies: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Per-atom energies (n,) eV -> per-structure sums (num_graphs,) eV."""
    out = torch.zeros(num_graphs, dtype=atom_energies.dtype, device=atom_energies.device)
    return out.index_add(0, batch, atom_energies)


@_full_precision
def coulomb_atom_energies(charges: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                          sigma: float) -> torch.Tensor:
    """Erf-damped Coulomb energy over all pairs of atoms of each structure (no periodic images), per atom.

    charges (n,) e, pos (n,3) Å, batch (n,) structure index in [0, num_graphs), sigma Å -> (n,) eV, each
    pair's energy split equally between its two atoms. Cost O(sum n_s^2).
    """
    dtype = _compute_dtype(charges, pos)
    q, r = charges.to(dtype), pos.to(dtype)
    i, j = _pairs_within(batch, num_graphs)
    dist = torch.linalg.norm(r[j] - r[i], dim=-1)
    half = 0.5 * COULOMB_CONSTANT * q[i] * q[j] * torch.erf(dist / (math.sqrt(2.0) * sigma)) / dist
    return torch.zeros_like(q).index_add(0, i, half).index_add(0, j, half)


def coulomb_energy(charges: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                   sigma: float) -> torch.Tensor:
    """``coulomb_atom_energies`` summed per structure: (num_graphs,) eV (0 for structures without atoms)."""
    return structure_sum(coulomb_atom_energies(charges, pos, batch, num_graphs, sigma), batch, num_graphs)


@_full_precision
def ewald_real_space_energy(charges: torch.Tensor, vectors: torch.Tensor, sender: torch.Tensor,
                            receiver: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                            sigma: float) -> torch.Tensor:
    """Real-space term of a standard Ewald split: (K/2) sum_edges q_s q_r erfc(r / (sqrt(2) sigma)) / r.

    With a full neighbour list (both directions, periodic images, cutoff where erfc is negligible, e.g.
    ~7 sigma) it turns ``ewald_energy`` into the energy of point charges. vectors (E,3) Å, sender and
    receiver (E,) -> (num_graphs,) eV. Not used by the latent-charge head (its charges stay smeared).
    """
    dtype = _compute_dtype(charges, vectors)
    q = charges.to(dtype)
    dist = torch.linalg.norm(vectors.to(dtype), dim=-1)
    pair = q[sender] * q[receiver] * torch.erfc(dist / (math.sqrt(2.0) * sigma)) / dist
    energy = torch.zeros(num_graphs, dtype=dtype, device=vectors.device).index_add(0, batch[receiver], pair)
    return 0.5 * COULOMB_CONSTANT * energy


def self_energy(charges: torch.Tensor, sigma: float) -> torch.Tensor:
    """K q_i^2 / (sqrt(2 pi) sigma) per atom (n,) eV: the smeared charges' self-interaction."""
    q = charges.to(_compute_dtype(charges))
    return COULOMB_CONSTANT * q * q / (math.sqrt(2.0 * math.pi) * sigma)


# --- periodic cells: latent Ewald ------------------------------------------------------------------------
def _max_indices(cells: torch.Tensor, kcut: float) -> list[list[int]]:
    """Largest |n_i| per lattice vector with |k| <= kcut: n_i = k.a_i / 2 pi, so |n_i| <= kcut |a_i| / 2 pi."""
    lengths = torch.linalg.norm(cells.detach().reshape(-1, 3, 3), dim=2)
    return torch.floor(kcut * lengths / (2.0 * math.pi)).long().tolist()


def kvectors(cell: torch.Tensor, kcut: float, nmax: list[int] | None = None) -> torch.Tensor:
    """Half of the reciprocal vectors 0 < |k| <= kcut of one cell (3,3) Å (rows = lattice vectors): (K,3) 1/Å.

    Only one of each pair +-k is kept (|S(k)|^2 is even in k). Differentiable with respect to the cell;
    which integer vectors are kept is decided on the detached cell. nmax: ``_max_indices`` if known.
    """
    reciprocal = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)  # rows b_j, a_i . b_j = 2 pi delta_ij
    nmax = _max_indices(cell, kcut)[0] if nmax is None else nmax
    axes = [torch.arange(-m, m + 1, device=cell.device, dtype=cell.dtype) for m in nmax]
    n = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    half = (n[:, 0] > 0) | ((n[:, 0] == 0) & (n[:, 1] > 0)) | ((n[:, 0] == 0) & (n[:, 1] == 0) & (n[:, 2] > 0))
    n = n[half]
    k_sq = ((n @ reciprocal.detach()) ** 2).sum(-1)
    return n[k_sq <= kcut * kcut] @ reciprocal


def _check_cells(cell: torch.Tensor, structures: list[int]) -> torch.Tensor:
    """Volumes (P,) of the cells of the listed structures; ValueError for a (near) singular cell."""
    volume = torch.linalg.det(cell).abs()
    bad = [s for s, v in zip(structures, volume.detach().tolist()) if not v > 1e-6]
    if bad:
        raise ValueError(f"structures {bad} are periodic but their cells have zero volume; give each periodic "
                         "structure a full 3x3 cell (rows = lattice vectors, Å) or set its pbc to False")
    return volume


@_full_precision
def ewald_atom_energies(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                        num_graphs: int, sigma: float, kcut: float) -> torch.Tensor:
    """Latent Ewald (k-space only) energy of the periodic structures present in ``batch``, per atom.

    charges (n,) e, pos (n,3) Å, cell (num_graphs,3,3) Å, batch (n,), sigma Å, kcut 1/Å -> (n,) eV with
    E_i = K (2 pi / V) sum_k w(k) q_i Re(exp(-i k.r_i) S(k)) - K q_i^2 / (sqrt(2 pi) sigma), which sums to
    the structure's energy. Batched over structures by padding atoms and k-vectors: memory
    O(P * max n_s * max K_s) with K_s ~ V_s kcut^3 / (12 pi^2) (half of the sphere).
    """
    dtype = _compute_dtype(charges, pos, cell)
    q, r, cell = charges.to(dtype), pos.to(dtype), cell.to(dtype)
    if batch.numel() == 0:
        return torch.zeros_like(q)
    structures = torch.unique(batch).tolist()
    index = torch.as_tensor(structures, device=batch.device)
    volume = _check_cells(cell[index], structures)
    ks = [kvectors(cell[s], kcut, m) for s, m in zip(structures, _max_indices(cell[index], kcut))]
    kmax = max(1, max(k.shape[0] for k in ks))
    kpad = torch.zeros(len(ks), kmax, 3, dtype=dtype, device=pos.device)
    valid = torch.zeros(len(ks), kmax, dtype=torch.bool, device=pos.device)
    for p, k in enumerate(ks):
        kpad[p, : k.shape[0]] = k
        valid[p, : k.shape[0]] = True
    k_sq = (kpad ** 2).sum(-1)
    safe = torch.where(valid, k_sq, torch.ones_like(k_sq))
    weight = torch.where(valid, torch.exp(-0.5 * sigma * sigma * safe) / safe, torch.zeros_like(k_sq))

    local = torch.searchsorted(index, batch)  # structure -> row p of the padded arrays
    counts = torch.bincount(local, minlength=len(structures))
    slot = torch.arange(batch.numel(), device=batch.device)
    order = torch.argsort(local, stable=True)
    slot = torch.empty_like(slot).index_put((order,), slot - (torch.cumsum(counts, 0) - counts)[local[order]])
    nmax = int(counts.max())
    r_dense = torch.zeros(len(structures), nmax, 3, dtype=dtype, device=pos.device).index_put((local, slot), r)
    q_dense = torch.zeros(len(structures), nmax, dtype=dtype, device=pos.device).index_put((local, slot), q)
    phase = torch.bmm(r_dense, kpad.transpose(1, 2))  # (P, nmax, kmax)
    cos, sin = torch.cos(phase), torch.sin(phase)
    s_re = torch.einsum("pn,pnk->pk", q_dense, cos)
    s_im = torch.einsum("pn,pnk->pk", q_dense, sin)
    # q_i Re(exp(-i k.r_i) S(k)), summed over both halves of k-space (factor 2)
    per_atom = 2.0 * q_dense * torch.einsum("pk,pnk->pn", weight * s_re, cos) \
        + 2.0 * q_dense * torch.einsum("pk,pnk->pn", weight * s_im, sin)
    per_atom = COULOMB_CONSTANT * 2.0 * math.pi / volume[:, None] * per_atom
    return per_atom[local, slot] - self_energy(q, sigma)


def ewald_energy(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                 num_graphs: int, sigma: float, kcut: float) -> torch.Tensor:
    """``ewald_atom_energies`` summed per structure: (num_graphs,) eV (0 for structures without atoms)."""
    return structure_sum(ewald_atom_energies(charges, pos, cell, batch, num_graphs, sigma, kcut), batch, num_graphs)


# --- periodic cells: PME (torch-pme) ---------------------------------------------------------------------
def _truncated_coulomb(sigma: float, kcut: float):
    """A torch-pme Coulomb potential whose k-space kernel is cut at |k| <= kcut (the latent Ewald sum)."""
    try:
        import torchpme
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PME needs torch-pme: `pip install torch-pme` (or set pme_threshold to None to "
                          "use Ewald summation for every cell)") from err

    class TruncatedCoulomb(torchpme.CoulombPotential):
        def lr_from_k_sq(self, k_sq: torch.Tensor) -> torch.Tensor:
            kernel = super().lr_from_k_sq(k_sq)
            return kernel * (k_sq.detach() <= kcut * kcut).to(kernel.dtype)

    return torchpme, TruncatedCoulomb(smearing=sigma, prefactor=COULOMB_CONSTANT)


@_full_precision
def pme_atom_energies(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, sigma: float, kcut: float,
                      mesh_spacing: float, interpolation_nodes: int = 7) -> torch.Tensor:
    """The latent Ewald energy of ONE periodic structure by particle-mesh Ewald (torch-pme), per atom: (n,) eV.

    charges (n,) e, pos (n,3) Å, cell (3,3) Å; mesh_spacing Å must be below pi / kcut so that the mesh holds
    every |k| <= kcut. Equals ``ewald_energy`` up to the interpolation error (smaller for finer meshes and
    more ``interpolation_nodes``, 3..7). torch-pme's neutralising-background term is undone so that charged
    cells follow the same convention as ``ewald_energy``.
    """
    if not mesh_spacing < math.pi / kcut:
        raise ValueError(f"mesh_spacing {mesh_spacing} Å is too coarse for kcut {kcut} 1/Å; it must be below "
                         f"pi / kcut = {math.pi / kcut:.4f} Å")
    dtype = _compute_dtype(charges, pos, cell)
    q, r, cell = charges.to(dtype), pos.to(dtype), cell.to(dtype)
    volume = _check_cells(cell.unsqueeze(0), [0])[0]
    torchpme, potential = _truncated_coulomb(sigma, kcut)
    calculator = torchpme.PMECalculator(potential, mesh_spacing=mesh_spacing,
                                        interpolation_nodes=interpolation_nodes, full_neighbor_list=True)
    calculator = calculator.to(device=pos.device, dtype=dtype)
    no_pairs = torch.zeros(0, 2, dtype=torch.long, device=pos.device)
    no_dist = torch.zeros(0, dtype=dtype, device=pos.device)
    potential = calculator(q.unsqueeze(1), cell, r, no_pairs, no_dist).squeeze(1)  # (n,), includes the 1/2
    background = COULOMB_CONSTANT * math.pi * sigma * sigma * q.sum() / volume
    return q * (potential + background)


def pme_energy(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, sigma: float, kcut: float,
               mesh_spacing: float, interpolation_nodes: int = 7) -> torch.Tensor:
    """``pme_atom_energies`` summed: the energy () eV of one periodic structure."""
    return pme_atom_energies(charges, pos, cell, sigma, kcut, mesh_spacing, interpolation_nodes).sum()


def default_mesh_spacing(sigma: float, kcut: float) -> float:
    """min(sigma / 2, 0.9 pi / kcut) Å: ~1e-7 relative PME error with 7 interpolation nodes, all |k| <= kcut held."""
    return min(0.5 * sigma, 0.9 * math.pi / kcut)


# --- dispatch --------------------------------------------------------------------------------------------
def electrostatic_atom_energies(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                                batch: torch.Tensor, num_graphs: int, sigma: float = 1.0, kcut: float | None = None,
                                pme_threshold: int | None = None, mesh_spacing: float | None = None,
                                interpolation_nodes: int = 7, periodic_allowed: bool = True) -> torch.Tensor:
    """Per-atom energies (n,) eV of a mixed batch of molecules and periodic cells.

    charges (n,) e, pos (n,3) Å, cell (B,3,3) Å, pbc (B,3) bool, batch (n,); kcut None -> 6 / sigma (1/Å,
    truncation weight exp(-18) ~ 1.5e-8; pi as in the LES paper is ~1e-2 eV off for water in a box).
    Structures without a periodic direction: ``coulomb_atom_energies``. Periodic structures with fewer than
    ``pme_threshold`` atoms (or all, if it is None): ``ewald_atom_energies``; larger ones:
    ``pme_atom_energies`` with ``mesh_spacing`` (default ``default_mesh_spacing``).
    ``periodic_allowed=False`` makes a periodic structure a ValueError.
    """
    kcut = 6.0 / sigma if kcut is None else kcut
    periodic = pbc.reshape(num_graphs, 3).any(dim=1)
    atom_periodic = periodic[batch]
    if not periodic_allowed and bool(periodic.any()):
        bad = torch.nonzero(periodic).flatten().tolist()
        raise ValueError(f"structures {bad} are periodic, but long_range kind 'coulomb' only handles molecules; "
                         "use kind 'latent_ewald' or set pbc to False")
    mol = torch.nonzero(~atom_periodic).flatten()
    mol_energy = coulomb_atom_energies(charges[mol], pos[mol], batch[mol], num_graphs, sigma)
    energy = torch.zeros(batch.numel(), dtype=mol_energy.dtype, device=pos.device).index_put((mol,), mol_energy)
    if not bool(periodic.any()):
        return energy
    counts = torch.bincount(batch, minlength=num_graphs)
    use_pme = periodic & (counts >= pme_threshold) if pme_threshold is not None else torch.zeros_like(periodic)
    ewald = torch.nonzero(atom_periodic & ~use_pme[batch]).flatten()
    if ewald.numel():
        e_ewald = ewald_atom_energies(charges[ewald], pos[ewald], cell, batch[ewald], num_graphs, sigma, kcut)
        energy = energy.index_put((ewald,), e_ewald.to(energy.dtype))
    spacing = mesh_spacing if mesh_spacing is not None else default_mesh_spacing(sigma, kcut)
    for s in torch.nonzero(use_pme).flatten().tolist():
        atoms = torch.nonzero(batch == s).flatten()
        e_s = pme_atom_energies(charges[atoms], pos[atoms], cell[s], sigma, kcut, spacing, interpolation_nodes)
        energy = energy.index_put((atoms,), e_s.to(energy.dtype))
    return energy


def electrostatic_energy(charges: torch.Tensor, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                         batch: torch.Tensor, num_graphs: int, **options) -> torch.Tensor:
    """``electrostatic_atom_energies`` summed per structure: (num_graphs,) eV; same keyword options."""
    atom = electrostatic_atom_energies(charges, pos, cell, pbc, batch, num_graphs, **options)
    return structure_sum(atom, batch, num_graphs)
