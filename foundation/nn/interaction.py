"""Interaction block (MACE's RealAgnosticResidualInteractionBlock without the skip, which is ``ElementLinear``).

  h_up = linear_up(h)                                               (n, D_in, C)
  R    = radial_mlp(edge_feats)                                     (E, P, C), one weight per path and channel
  A_i[p, M, c] = sum_{j -> i} R_ij[p, c] sum_{m1, m2} cg_p[m1, m2, M] h_up[j, l1 m1, c] Y_ij[l2 m2]   ("uvu")
  A    = linear(A) / avg_num_neighbors                              (n, (max_ell+1)^2, C), per l3: (P_l3 C) -> C

Speed: the per-edge messages (E, sum_p (2 l3 + 1), C) are never formed and nothing is scattered. Edges are
laid out per receiver in a padded (n, K) table (``PaddedNeighbors``, K = max in-degree, empty slots have
zero radial weight), so for each path the sum over neighbours and m1 is one batched GEMM
(n, 2 l3 + 1, K (2 l1 + 1)) @ (n, K (2 l1 + 1), C).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cg import block, conv_paths, irreps_dim, path_cg
from .linear import IrrepsLinear
from .radial import RadialMLP


@dataclass(frozen=True)
class PaddedNeighbors:
    """Edges placed in a (n, K) table per receiver: ``index`` (E,) slot of each edge in the flat (n*K) table,
    ``sender`` (n*K,) sender of each slot (0 for empty slots), ``num_nodes`` n, ``width`` K."""

    index: torch.Tensor
    sender: torch.Tensor
    num_nodes: int
    width: int

    @staticmethod
    def build(sender: torch.Tensor, receiver: torch.Tensor, num_nodes: int) -> PaddedNeighbors:
        """sender, receiver (E,) node indices (any edge order)."""
        degree = torch.bincount(receiver, minlength=num_nodes)
        width = int(degree.max()) if receiver.numel() else 0
        order = torch.argsort(receiver, stable=True)
        start = torch.cumsum(degree, 0) - degree
        slot = torch.empty_like(receiver)
        slot[order] = torch.arange(receiver.numel(), device=receiver.device) - start[receiver[order]]
        index = receiver * width + slot
        send = torch.zeros(num_nodes * width, dtype=sender.dtype, device=sender.device).index_copy(0, index, sender)
        return PaddedNeighbors(index, send, num_nodes, width)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Edge values (E, ...) -> (n*K, ...) with zeros in empty slots."""
        out = x.new_zeros((self.num_nodes * self.width,) + tuple(x.shape[1:]))
        return out.index_copy(0, self.index, x)


class Interaction(nn.Module):
    """Equivariant convolution: node features (n, (l_in+1)^2, C) -> aggregated messages (n, (max_ell+1)^2, C).

    Paths are processed in groups of equal (l1, l3) (they differ in l2): one broadcast product R * h and one
    batched GEMM per group. The radial MLP's output columns are ordered by (l1, l3, l2) so each group's
    weights are contiguous; the linear map of each l3 takes its paths in (l1, l2) order.
    """

    def __init__(self, l_in: int, max_ell: int, channels: int, num_bessel: int, radial_hidden: list[int],
                 dtype: torch.dtype, density: bool = False):
        super().__init__()
        self.l_in, self.max_ell, self.channels = l_in, max_ell, channels
        paths = conv_paths(l_in, max_ell)  # sorted by (l3, l1, l2)
        self.counts = [sum(1 for p in paths if p[2] == l3) for l3 in range(max_ell + 1)]
        self.groups = sorted({(l1, l3) for l1, _, l3 in paths})  # (l1, l3), radial order
        self.group_l2 = [[l2 for l1, l2, l3 in paths if (l1, l3) == g] for g in self.groups]
        radial_order = [(l1, l2, l3) for l1, l3 in self.groups for l2 in self.group_l2[self.groups.index((l1, l3))]]
        self.radial_index = [radial_order.index(path) for path in paths]  # conv_paths index -> radial column
        for g, ((l1, l3), l2s) in enumerate(zip(self.groups, self.group_l2)):
            # (D_Y, P_g * d1 * d3): Y @ table gives every path's coupling cg_p[m1, m2, M] Y[l2 m2] at once
            table = torch.zeros(irreps_dim(max_ell), len(l2s), 2 * l1 + 1, 2 * l3 + 1, dtype=torch.float64)
            for k, l2 in enumerate(l2s):
                table[block(l2), k] = path_cg(l1, l2, l3).permute(1, 0, 2)
            self.register_buffer(f"cg_{g}", table.reshape(table.shape[0], -1).to(dtype), persistent=False)
        self.linear_up = IrrepsLinear(l_in, channels, channels, dtype)
        self.radial = RadialMLP([num_bessel, *radial_hidden, len(paths) * channels], dtype)
        self.linear = nn.ParameterList(
            [nn.Parameter(torch.randn(c * channels, channels, dtype=dtype)) for c in self.counts])
        # mace's Density blocks: per-node density sum_j tanh((b(r_ij) . w / sqrt(num_bessel))^2) replaces the
        # average neighbour count as the normaliser: messages / (density + 1)
        self.density = nn.Parameter(torch.randn(num_bessel, 1, dtype=dtype)) if density else None

    def forward(self, h: torch.Tensor, sh: torch.Tensor, edge_feats: torch.Tensor, nbrs: PaddedNeighbors,
                avg_num_neighbors: float) -> torch.Tensor:
        """h (n, D_in, C); sh (E, D_Y) spherical harmonics; edge_feats (E, num_bessel); nbrs for the E edges.

        Returns A (n, (max_ell+1)^2, C).
        """
        n, k, c = nbrs.num_nodes, nbrs.width, self.channels
        if n * k <= 1.25 * edge_feats.shape[0]:  # little padding: run the MLP on padded rows (MLP(0) = 0)
            weights = self.radial(nbrs.pad(edge_feats))
        else:
            weights = nbrs.pad(self.radial(edge_feats))
        sizes = [len(l2s) for l2s in self.group_l2]
        weights = weights.view(n * k, sum(sizes), c).split(sizes, dim=1)  # (nK, P_g, C)
        sh_pad = nbrs.pad(sh)  # (nK, D_Y)
        h_send = self.linear_up(h)[nbrs.sender].split([2 * l + 1 for l in range(self.l_in + 1)], dim=1)
        per_l3: list[list[torch.Tensor]] = [[] for _ in range(self.max_ell + 1)]
        for g, ((l1, l3), l2s) in enumerate(zip(self.groups, self.group_l2)):
            p, d1, d3 = len(l2s), 2 * l1 + 1, 2 * l3 + 1
            coupling = (sh_pad @ getattr(self, f"cg_{g}")).view(n, k, p, d1, d3)
            coupling = coupling.permute(2, 0, 4, 1, 3).reshape(p * n, d3, k * d1)
            x = weights[g].transpose(0, 1).contiguous().unsqueeze(2) * h_send[l1].unsqueeze(0)  # (P_g, nK, d1, C)
            out = torch.bmm(coupling, x.view(p * n, k * d1, c))  # (P_g n, d3, C)
            per_l3[l3].append(out.view(p, n, d3, c))
        norm = avg_num_neighbors
        if self.density is not None:
            edge_density = torch.tanh((edge_feats @ (self.density / math.sqrt(self.density.shape[0]))).pow(2))
            norm = 1.0  # the density divides below
        result = []
        for l3, (parts, w) in enumerate(zip(per_l3, self.linear)):
            x = torch.cat(parts, dim=0).permute(1, 2, 0, 3).reshape(n, 2 * l3 + 1, -1)  # (n, d3, P_l3 C)
            result.append(x @ (w / (math.sqrt(self.counts[l3] * c) * norm)))
        out = torch.cat(result, dim=1)
        if self.density is not None:
            density = nbrs.pad(edge_density).view(n, k).sum(dim=1) if k else out.new_zeros(n)
            out = out / (density + 1.0).view(n, 1, 1)
        return out
