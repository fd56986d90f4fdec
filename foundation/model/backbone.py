"""``FoundationModel``: the MACE-style equivariant backbone, one forward pass from a PyG batch to energies.

Reads top to bottom (``forward``):
  1. inputs in the model dtype; element index per atom; nodes sorted by element (per-element weight gathers)
  2. strain (for stress) and edge vectors r_ij = pos[recv] - pos[send] + shifts
  3. radial features b(r) f_cut(r), spherical harmonics Y(r_ij / r) (e3nn, component normalisation);
     initial features W[z] (+ an embedding of the structure's total charge when ``max_total_charge`` > 0)
  4. layers: sc = W_skip[z] h;  A = interaction(h);  h = linear(product_basis(A)) + sc;  readout per head
  5. per-atom energies (E0 + scale * interaction + shift, see ``heads``)
  6. optional long-range head: latent charges from the last invariant features, electrostatic energy
     (erf-Coulomb for molecules, Ewald / PME for cells; ``nn.charges``), added per atom; per-structure sums
  7. forces, stress, virials by autograd (through the strained cell for the k-space sum)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from e3nn import o3
from torch import nn

from .. import keys
from ..hub import HubMixin
from ..nn.charges import LongRangeHead
from ..nn.electrostatics import strained_cell
from ..nn.interaction import Interaction, PaddedNeighbors
from ..nn.linear import ChargeEmbedding, ElementEmbedding, ElementGroups, ElementLinear, IrrepsLinear
from ..nn.pair import AgnesiTransform, ZBLRepulsion
from ..nn.radial import BesselCutoff
from ..nn.readout import LinearReadout, NonLinearReadout
from ..nn.symmetric_contraction import SymmetricContraction
from . import derivatives
from .config import ModelConfig
from .heads import HeadStatistics, update_statistics

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FoundationModel(HubMixin, nn.Module):
    """MACE-style backbone with multi-head readouts. ``FoundationModel(config)``; weights random (torch seed).

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from ``foundation.hub.HubMixin``.
    """

    config_class = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        dtype = _DTYPES[config.dtype]
        c, n_el, n_heads = config.num_channels, len(config.elements), len(config.heads)
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(config.atomic_numbers)] = torch.arange(n_el)
        self.register_buffer("element_index", table, persistent=False)
        self.embedding = ElementEmbedding(n_el, c, dtype)
        self.charge_embedding = ChargeEmbedding(config.max_total_charge, c, dtype) if config.max_total_charge else None
        self.radial_basis = BesselCutoff(config.r_max, config.num_bessel, config.num_poly_cutoff)
        self.distance_transform = AgnesiTransform(config.distance_transform) if config.distance_transform else None
        self.pair_repulsion = ZBLRepulsion(config.pair_repulsion) if config.pair_repulsion else None
        self.register_buffer("numbers", torch.tensor(config.atomic_numbers), persistent=False)
        # mace's non-residual first block: no skip; a per-element linear map of the messages instead
        self.plain_first = config.first_interaction == "plain"
        self.element_mix = ElementLinear(config.max_ell, n_el, c, c, dtype) if self.plain_first else None
        density = config.interaction_norm == "density"
        self.interactions, self.skips = nn.ModuleList(), nn.ModuleList()
        self.products, self.product_linears, self.readouts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for t in range(config.num_layers):
            last = t == config.num_layers - 1
            l_in = 0 if t == 0 else config.max_L
            l_out = 0 if last else config.max_L
            self.interactions.append(Interaction(l_in, config.max_ell, c, config.num_bessel, config.radial_mlp, dtype,
                                                 density))
            self.skips.append(nn.Identity() if t == 0 and self.plain_first
                              else ElementLinear(min(l_in, l_out), n_el, c, c, dtype))
            self.products.append(SymmetricContraction(config.max_ell, l_out, config.correlation, n_el, c, dtype))
            self.product_linears.append(IrrepsLinear(l_out, c, c, dtype))
            self.readouts.append(NonLinearReadout(c, config.readout_mlp, n_heads, dtype) if last
                                 else LinearReadout(c, n_heads, dtype))
        self.statistics = HeadStatistics(config, dtype)
        # latent charges from the last layer's invariant features -> erf-Coulomb / Ewald / PME energy
        self.long_range = LongRangeHead(c, config.long_range, dtype) if config.long_range is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # ---------------------------------------------------------------------------------------------------
    def forward(self, batch, compute_forces: bool = True, compute_stress: bool = False,
                training: bool = False) -> dict[str, torch.Tensor]:
        """batch: PyG ``Batch`` (or one ``Data``) with the fields of ``foundation.keys``.

        Returns {ENERGY (B,) eV, NODE_ENERGY (n,) eV, FORCES (n,3) eV/Å if compute_forces, STRESS (B,3,3)
        eV/Å³ and VIRIALS (B,3,3) eV if compute_stress}. ENERGY and NODE_ENERGY are float64 whatever the model's
        dtype (E0 added in float64), the rest in the model's dtype. ``training=True`` keeps the autograd graph
        (create_graph) so that losses on forces and stress can be backpropagated.
        """
        with torch.enable_grad() if (compute_forces or compute_stress) else nullcontext():
            g = self._inputs(batch)
            pos = g["pos"] if g["pos"].requires_grad or not (compute_forces or compute_stress) \
                else g["pos"].detach().requires_grad_(True)
            displacement = None
            pos_s, shifts, cell_s = pos, g["shifts"], g["cell"]
            if compute_stress:
                displacement, pos_s, shifts = derivatives.apply_strain(pos, shifts, g["batch"], g["sender"],
                                                                       g["num_graphs"])
                cell_s = strained_cell(g["cell"], displacement)
            out = self._energies(g, pos_s, shifts, cell_s)
            energy = out[keys.ENERGY]
            if compute_forces or compute_stress:
                forces, stress, virials = derivatives.forces_and_stress(energy, pos, displacement, g["cell"],
                                                                        g["pbc"], create_graph=training)
                if compute_forces:
                    out[keys.FORCES] = forces
                if compute_stress:
                    out[keys.STRESS], out[keys.VIRIALS] = stress, virials
        if not training:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def _energies(self, g: dict, pos: torch.Tensor, shifts: torch.Tensor, cell: torch.Tensor) -> dict:
        """{ENERGY (B,), NODE_ENERGY (n,)} eV (+ CHARGES (n,) e, DIPOLE (B,3) e·Å with a long-range head) from
        (possibly strained) positions (n,3) Å, shifts (E,3) Å and cells (B,3,3) Å."""
        node_energy, features = self._node_energies(g, pos, shifts)   # without E0, model dtype
        out = {}
        if self.long_range is not None:
            out = self.long_range(features, pos, g["batch"], g["num_graphs"], cell, g["pbc"], g["total_charge"])
            node_energy = node_energy + out[keys.NODE_ENERGY].to(node_energy.dtype)
        residual = torch.zeros(g["num_graphs"], dtype=node_energy.dtype, device=node_energy.device)
        residual = residual.index_add(0, g["batch"], node_energy)
        e0 = self.statistics.reference(g["z"], g["head"][g["batch"]])         # (n,) float64
        e0_sum = torch.zeros(g["num_graphs"], dtype=e0.dtype, device=e0.device).index_add(0, g["batch"], e0)
        # the E0 sum is added in float64: total energies keep every digit of the float64 references
        out.update({keys.ENERGY: residual.to(torch.float64) + e0_sum,
                    keys.NODE_ENERGY: node_energy.to(torch.float64) + e0})
        return out

    def _node_energies(self, g: dict, pos: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom short-range energies (n,) eV and last-layer invariant features (n, C), input atom order,
        from (possibly strained) positions (n,3) and shifts (E,3)."""
        cfg = self.config
        sender, receiver = g["sender"], g["receiver"]
        vectors = pos[receiver] - pos[sender] + shifts
        lengths = torch.linalg.norm(vectors, dim=-1)
        z_send, z_recv = g["z"][sender], g["z"][receiver]
        transformed = None if self.distance_transform is None else self.distance_transform(lengths, z_send, z_recv)
        edge_feats = self.radial_basis(lengths, transformed)
        sh = o3.spherical_harmonics(list(range(cfg.max_ell + 1)), vectors, normalize=True, normalization="component")
        coordination = torch.zeros_like(pos[:, 0]).index_add(0, receiver, self.radial_basis.envelope(lengths))

        order = torch.argsort(g["z"], stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        groups = ElementGroups.from_sorted(g["z"][order], len(cfg.elements))
        nbrs = PaddedNeighbors.build(rank[sender], rank[receiver], order.numel())
        h = self.embedding(g["z"][order])
        if self.charge_embedding is not None:  # the structure's total charge, on every atom (zero when neutral)
            h = h + self.charge_embedding(g["total_charge"])[g["batch"][order]].unsqueeze(1)
        readout = 0.0
        for t, (interaction, skip, product, linear, read) in enumerate(zip(
                self.interactions, self.skips, self.products, self.product_linears, self.readouts)):
            a = interaction(h, sh, edge_feats, nbrs, cfg.avg_num_neighbors)
            if t == 0 and self.plain_first:
                h = linear(product(self.element_mix(a, groups), groups))
            else:
                h = _add_prefix(linear(product(a, groups)), skip(h, groups))
            readout = readout + read(h[:, 0, :])
        readout = readout[rank]  # back to input atom order, (n, H)
        head = g["head"][g["batch"]]
        own = readout.gather(1, head.unsqueeze(1)).squeeze(1)
        if self.pair_repulsion is not None:
            number = self.numbers.to(pos.dtype)
            own = own + self.pair_repulsion(lengths, receiver, pos.shape[0], z_send, z_recv, number[z_send],
                                            number[z_recv])
        if self.config.energy_form == "mace":
            return self.statistics.mace_node_energies(head, own), h[:, 0, :][rank]
        iso = self._isolated_readouts(groups)[g["z"], head]
        return self.statistics.node_energies(head, own, iso, coordination), h[:, 0, :][rank]

    def _isolated_readouts(self, groups: ElementGroups) -> torch.Tensor:
        """Summed readouts (N_el, H) of an atom with no neighbours, for the elements present (zeros elsewhere).

        With no edges A = 0, so the product basis is 0 and each layer reduces to its skip connection.
        """
        present = [e for e, _, _ in groups.slices]
        z = torch.tensor(present, dtype=torch.long, device=self.embedding.weight.device)
        single = ElementGroups(tuple((e, k, k + 1) for k, e in enumerate(present)))
        h = self.embedding(z)
        readout = 0.0
        for t, (skip, read) in enumerate(zip(self.skips, self.readouts)):
            h = h.new_zeros(h.shape[0], 1, h.shape[2]) if t == 0 and self.plain_first else skip(h, single)[:, :1]
            readout = readout + read(h[:, 0, :])
        n_heads = len(self.config.heads)
        full = torch.zeros(len(self.config.elements), n_heads, dtype=self.dtype, device=z.device)
        return full.index_copy(0, z, readout.to(full.dtype)) if present else full

    # ---------------------------------------------------------------------------------------------------
    def _inputs(self, batch) -> dict:
        """Graph fields in the model's dtype/device, with checks that name what is wrong."""
        device, dtype = self.embedding.weight.device, self.dtype
        for name in (keys.POSITIONS, keys.ATOMIC_NUMBERS, keys.EDGE_INDEX, keys.SHIFTS):
            if getattr(batch, name, None) is None:
                raise ValueError(f"batch has no {name!r}; build graphs with foundation.data.from_atoms(atoms, "
                                 f"r_max={self.config.r_max})")
        numbers = batch[keys.ATOMIC_NUMBERS].to(device)
        if numbers.numel() and (numbers.min() < 0 or numbers.max() > 118):
            raise ValueError(f"atomic numbers out of range 0..118 in the batch: {numbers.unique().tolist()}")
        z = self.element_index[numbers]
        if (z < 0).any():
            from ase.data import chemical_symbols
            bad = sorted({chemical_symbols[int(n)] for n in numbers[z < 0].unique()})
            raise ValueError(f"the batch contains elements {bad} that this model does not know; "
                             f"the model covers {self.config.elements}")
        n = numbers.shape[0]
        vec = getattr(batch, "batch", None)
        vec = torch.zeros(n, dtype=torch.long, device=device) if vec is None else vec.to(device)
        num_graphs = int(batch.num_graphs) if hasattr(batch, "num_graphs") else 1
        head = getattr(batch, keys.HEAD, None)
        head = torch.zeros(num_graphs, dtype=torch.long, device=device) if head is None else head.to(device).view(-1)
        if head.numel() and (head.min() < 0 or head.max() >= len(self.config.heads)):
            raise ValueError(f"batch field {keys.HEAD!r} has indices {head.unique().tolist()} but the model has "
                             f"heads {self.config.heads} (indices 0..{len(self.config.heads) - 1})")
        cell = getattr(batch, keys.CELL, None)
        cell = torch.zeros(num_graphs, 3, 3) if cell is None else cell
        pbc = getattr(batch, keys.PBC, None)
        pbc = torch.zeros(num_graphs, 3, dtype=torch.bool) if pbc is None else pbc
        edge_index = batch[keys.EDGE_INDEX].to(device)
        charge = getattr(batch, keys.TOTAL_CHARGE, None)  # e; missing (NaN) or absent = neutral
        charge = torch.zeros(num_graphs) if charge is None else torch.nan_to_num(charge.view(-1), nan=0.0)
        return {"pos": batch[keys.POSITIONS].to(device=device, dtype=dtype), "z": z, "batch": vec,
                "total_charge": charge.to(device=device, dtype=dtype), "num_graphs": num_graphs, "head": head,
                "sender": edge_index[0], "receiver": edge_index[1],
                "shifts": batch[keys.SHIFTS].to(device=device, dtype=dtype),
                "cell": cell.to(device=device, dtype=dtype).view(-1, 3, 3), "pbc": pbc.to(device).view(-1, 3)}

    # ---------------------------------------------------------------------------------------------------
    def hessian_vector_product(self, batch, vectors: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """H v, H = d^2 E / dpos^2 (eV/Å²): vectors (n,3) or (n,3,k) -> same shape, double backward.

        ``create_graph=True`` keeps the graph so that a loss on H v can be backpropagated (distillation).
        """
        with torch.enable_grad():
            g = self._inputs(batch)
            pos = g["pos"].detach().requires_grad_(True)
            node_energy = self._energies(g, pos, g["shifts"], g["cell"])[keys.NODE_ENERGY]
            hv = derivatives.hessian_vector_product(node_energy, pos, vectors.to(pos), create_graph)
        return hv if create_graph else hv.detach()

    def set_statistics(self, atomic_energies: Mapping[str, float] | Sequence[float] | None = None,
                       scale: float | None = None, shift: float | None = None,
                       avg_num_neighbors: float | None = None, head: str | None = None) -> None:
        """Update E0 (eV per element), scale, shift (eV/atom) of ``head`` (all heads if None) and the mean
        neighbour count, in ``self.config`` and in the buffers."""
        update_statistics(self.config, head, atomic_energies, scale, shift, avg_num_neighbors)
        self.statistics.load_config(self.config)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())


def _add_prefix(h: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """h (n, D, C) + sc (n, D_sc <= D, C) on the first D_sc components."""
    if sc.shape[1] == h.shape[1]:
        return h + sc
    return torch.cat([h[:, :sc.shape[1]] + sc, h[:, sc.shape[1]:]], dim=1)

