"""Per-layer energy readouts with several named heads (one value per head per atom).

Layers before the last: linear, E_i = h_i[0e] . w / sqrt(C). Last layer: per head an MLP C -> hidden -> 1 with
normalised silu (MACE's NonLinearReadoutBlock with 16x0e). Heads are independent (one weight set each), so
a head can be added or re-initialised without touching the others. No biases: zero features give zero energy.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .radial import normalized_silu


class LinearReadout(nn.Module):
    """Scalars (n, C) -> (n, num_heads)."""

    def __init__(self, channels: int, num_heads: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, num_heads, dtype=dtype))
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight * self.scale)


class NonLinearReadout(nn.Module):
    """Scalars (n, C) -> (n, num_heads) via a per-head MLP C -> hidden -> 1."""

    def __init__(self, channels: int, hidden: int, num_heads: int, dtype: torch.dtype):
        super().__init__()
        self.weight_in = nn.Parameter(torch.randn(num_heads, channels, hidden, dtype=dtype))
        self.weight_out = nn.Parameter(torch.randn(num_heads, hidden, dtype=dtype))
        self.scale_in = 1.0 / math.sqrt(channels)
        self.scale_out = 1.0 / math.sqrt(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_heads, _, hidden = self.weight_in.shape
        w_in = (self.weight_in * self.scale_in).permute(1, 0, 2).reshape(x.shape[-1], num_heads * hidden)
        y = normalized_silu(x @ w_in).view(x.shape[0], num_heads, hidden)
        return (y * (self.weight_out * self.scale_out)).sum(-1)
