"""Radial part of the edge embedding: Bessel basis times a smooth polynomial cutoff, and the radial MLP.

b_n(r) = sqrt(2/r_max) sin(n pi r / r_max) / r (n = 1..num_bessel, fixed frequencies), f(r) the polynomial
envelope of order p with f(r_max) = f'(r_max) = f''(r_max) = 0. The MLP has no biases and silu(0) = 0, so the
radial weights vanish smoothly (with two derivatives) as an edge reaches r_max.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _silu_second_moment_normalizer() -> float:
    """1 / sqrt(E[silu(z)^2]) for z ~ N(0,1), by quadrature (e3nn's normalize2mom constant, ~1.67653)."""
    z = np.linspace(-12.0, 12.0, 200001)
    silu = z / (1.0 + np.exp(-z))
    density = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    second = np.trapezoid(silu * silu * density, z) if hasattr(np, "trapezoid") else np.trapz(silu * silu * density, z)
    return float(1.0 / math.sqrt(second))


SILU_NORM = _silu_second_moment_normalizer()


def normalized_silu(x: torch.Tensor) -> torch.Tensor:
    """silu scaled to unit second moment on N(0,1) inputs."""
    return SILU_NORM * torch.nn.functional.silu(x)


class BesselCutoff(nn.Module):
    """Edge lengths (E,) Å -> radial features (E, num_bessel): Bessel basis times polynomial envelope."""

    def __init__(self, r_max: float, num_bessel: int, p: int):
        super().__init__()
        self.r_max = float(r_max)
        self.p = int(p)
        self.register_buffer("freq", torch.arange(1, num_bessel + 1, dtype=torch.float64) * math.pi / r_max,
                             persistent=False)
        self.prefactor = math.sqrt(2.0 / r_max)

    def envelope(self, r: torch.Tensor) -> torch.Tensor:
        """Polynomial cutoff f(r) (E,), 1 at r = 0, 0 for r >= r_max."""
        p = self.p
        x = r / self.r_max
        f = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p) + p * (p + 2.0) * x.pow(p + 1)
             - p * (p + 1.0) / 2.0 * x.pow(p + 2))
        return f * (x < 1.0).to(r.dtype)

    def forward(self, r: torch.Tensor, r_basis: torch.Tensor | None = None) -> torch.Tensor:
        """r (E,) Å, positive -> (E, num_bessel). ``r_basis`` (E,): a transformed length for the Bessel basis
        (mace's distance transforms); the envelope always sees r."""
        r1 = (r if r_basis is None else r_basis).unsqueeze(-1)
        bessel = self.prefactor * torch.sin(self.freq.to(r.dtype) * r1) / r1
        return bessel * self.envelope(r).unsqueeze(-1)


class RadialMLP(nn.Module):
    """Bias-free MLP (e3nn FullyConnectedNet): x <- act(x @ W / sqrt(fan_in)) for hidden layers, linear last.

    sizes = [num_bessel, *hidden, out]; weights N(0,1). Input (E, sizes[0]) -> (E, sizes[-1]).
    """

    def __init__(self, sizes: list[int], dtype: torch.dtype):
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(a, b, dtype=dtype)) for a, b in zip(sizes[:-1], sizes[1:])])
        self.scales = [1.0 / math.sqrt(a) for a in sizes[:-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, s) in enumerate(zip(self.weights, self.scales)):
            x = x @ (w * s)
            if i < last:
                x = normalized_silu(x)
        return x
