"""Interaction block (MACE's RealAgnosticResidualInteractionBlock without the skip, which is ``ElementLinear``).

  h_up = linear_up(h)                                               (n, D_in, C)
  R    = radial_mlp(edge_feats)                                     (E, P, C), one weight per path and channel
  m_ij[p, M, c] = R_ij[p, c] sum_{m1, m2} cg_p[m1, m2, M] h_up[j, l1 m1, c] Y_ij[l2 m2]     ("uvu" TP)
  A_i  = sum_{j -> i} m_ij                                          (n, D_mid, C), segment sum over receivers
  A    = linear(A) / avg_num_neighbors                              (n, (max_ell+1)^2, C), per l3: (P_l3 C) -> C
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .cg import block, conv_table, irreps_dim
from .linear import IrrepsLinear
from .radial import RadialMLP


class Interaction(nn.Module):
    """Equivariant convolution: node features (n, (l_in+1)^2, C) -> aggregated messages (n, (max_ell+1)^2, C)."""

    def __init__(self, l_in: int, max_ell: int, channels: int, num_bessel: int, radial_hidden: list[int],
                 dtype: torch.dtype):
        super().__init__()
        self.l_in, self.max_ell, self.channels = l_in, max_ell, channels
        cg, path_of, counts = conv_table(l_in, max_ell)
        self.counts = counts
        self.num_paths = sum(counts)
        self.register_buffer("cg", cg.to(dtype), persistent=False)
        self.register_buffer("path_of", path_of, persistent=False)
        self.linear_up = IrrepsLinear(l_in, channels, channels, dtype)
        self.radial = RadialMLP([num_bessel, *radial_hidden, self.num_paths * channels], dtype)
        self.linear = nn.ParameterList(
            [nn.Parameter(torch.randn(c * channels, channels, dtype=dtype)) for c in counts])

    def forward(self, h: torch.Tensor, sh: torch.Tensor, edge_feats: torch.Tensor, sender: torch.Tensor,
                receiver: torch.Tensor, avg_num_neighbors: float) -> torch.Tensor:
        """h (n, D_in, C); sh (E, D_Y) spherical harmonics; edge_feats (E, num_bessel); sender/receiver (E,).

        Returns A (n, (max_ell+1)^2, C).
        """
        n, e = h.shape[0], sh.shape[0]
        h_up = self.linear_up(h)
        weights = self.radial(edge_feats).view(e, self.num_paths, self.channels)
        coupling = torch.einsum("eb,abo->eao", sh, self.cg)  # (E, D_in, D_mid)
        msg = torch.einsum("eao,eac->eoc", coupling, h_up[sender]) * weights[:, self.path_of]
        agg = torch.zeros(n, msg.shape[1], self.channels, dtype=msg.dtype, device=msg.device)
        agg = agg.index_add(0, receiver, msg)
        return self._mix(agg) / avg_num_neighbors

    def _mix(self, agg: torch.Tensor) -> torch.Tensor:
        """(n, D_mid, C) grouped by l3 as (2 l3 + 1, P_l3) -> (n, (max_ell+1)^2, C), mixing paths and channels."""
        n, out, start = agg.shape[0], [], 0
        for l3, (count, w) in enumerate(zip(self.counts, self.linear)):
            width = (2 * l3 + 1) * count
            x = agg[:, start:start + width].reshape(n, 2 * l3 + 1, count * self.channels)
            out.append(x @ (w / math.sqrt(count * self.channels)))
            start += width
        return torch.cat(out, dim=1)
