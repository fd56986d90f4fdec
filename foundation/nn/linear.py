"""Equivariant linear maps on (n, D, C) features, shared or per element, and the element embedding.

Features: (n, D, C) with D = (l_max+1)^2 components (e3nn order) and C channels. A linear map mixes channels
inside each l block with its own weight (C_in, C_out) / sqrt(C_in); l blocks never mix, so it commutes with
rotations. Per-element maps use W[z] on nodes grouped by element (``ElementGroups``): one GEMM per element
present instead of a one-hot tensor product, which would waste a factor N_el.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cg import block


@dataclass(frozen=True)
class ElementGroups:
    """Nodes sorted by element: ``slices[k] = (element_index, start, stop)`` for each element present."""

    slices: tuple[tuple[int, int, int], ...]

    @staticmethod
    def from_sorted(z_sorted: torch.Tensor, num_elements: int) -> ElementGroups:
        """z_sorted (n,) element indices in non-decreasing order."""
        counts = torch.bincount(z_sorted, minlength=num_elements).tolist()
        out, start = [], 0
        for e, c in enumerate(counts):
            if c:
                out.append((e, start, start + c))
                start += c
        return ElementGroups(tuple(out))


class IrrepsLinear(nn.Module):
    """Per-l channel mixing: (n, (l_max+1)^2, C_in) -> (n, (l_max+1)^2, C_out), no bias."""

    def __init__(self, l_max: int, c_in: int, c_out: int, dtype: torch.dtype):
        super().__init__()
        self.l_max = l_max
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(c_in, c_out, dtype=dtype)) for _ in range(l_max + 1)])
        self.scale = 1.0 / math.sqrt(c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l_max == 0:
            return x @ (self.weights[0] * self.scale)
        return torch.cat([x[:, block(l)] @ (w * self.scale) for l, w in enumerate(self.weights)], dim=1)


class ElementLinear(nn.Module):
    """Per-element, per-l channel mixing (MACE's skip tensor product with the one-hot species).

    sc[i, lm, c'] = sum_c W_l[z_i, c, c'] h[i, lm, c] / sqrt(C N_el). (n, D, C) -> (n, D, C_out) for l <= l_max.
    """

    def __init__(self, l_max: int, num_elements: int, c_in: int, c_out: int, dtype: torch.dtype):
        super().__init__()
        self.l_max = l_max
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(num_elements, c_in, c_out, dtype=dtype)) for _ in range(l_max + 1)])
        self.scale = 1.0 / math.sqrt(c_in * num_elements)

    def forward(self, x: torch.Tensor, groups: ElementGroups) -> torch.Tensor:
        """x (n, D >= (l_max+1)^2, C) on element-sorted nodes -> (n, (l_max+1)^2, C_out)."""
        pieces = []
        for e, start, stop in groups.slices:
            xs = x[start:stop]
            if self.l_max == 0:
                pieces.append(xs[:, :1] @ (self.weights[0][e] * self.scale))
            else:
                pieces.append(torch.cat([xs[:, block(l)] @ (w[e] * self.scale) for l, w in enumerate(self.weights)], 1))
        if not pieces:
            return x.new_zeros(0, (self.l_max + 1) ** 2, self.weights[0].shape[-1])
        return torch.cat(pieces, dim=0)


class ElementEmbedding(nn.Module):
    """Element index (n,) -> initial scalar features (n, 1, C) = W[z] / sqrt(N_el)."""

    def __init__(self, num_elements: int, channels: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_elements, channels, dtype=dtype))
        self.scale = 1.0 / math.sqrt(num_elements)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.scale)[z].unsqueeze(1)


class ChargeEmbedding(nn.Module):
    """Total charge Q (B,) e, integer in [-max_charge, max_charge] -> (B, C) features added to every atom's
    initial scalar features (as UMA's charge embedding): E(Q) - E(0), so a neutral structure is unchanged and an
    isolated neutral atom keeps exactly its reference energy. Non-integer or out-of-range Q is a ValueError."""

    def __init__(self, max_charge: int, channels: int, dtype: torch.dtype):
        super().__init__()
        self.max_charge = int(max_charge)
        self.weight = nn.Parameter(torch.randn(2 * self.max_charge + 1, channels, dtype=dtype))

    def forward(self, charge: torch.Tensor) -> torch.Tensor:
        index = torch.round(charge)
        bad = ((index - charge).abs() > 1e-6) | (index.abs() > self.max_charge)
        if bool(bad.any()):
            raise ValueError(f"total charge(s) {charge[bad].tolist()} e: this model embeds integer total charges "
                             f"between -{self.max_charge} and {self.max_charge} (ModelConfig.max_total_charge)")
        index = index.long() + self.max_charge
        return self.weight[index] - self.weight[self.max_charge]
