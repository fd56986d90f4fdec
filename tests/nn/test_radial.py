"""Bessel basis, polynomial cutoff (smooth to second order at r_max), normalised silu, radial MLP."""
import math

import torch

from foundation.nn.radial import SILU_NORM, BesselCutoff, RadialMLP, normalized_silu


def test_bessel_values_and_envelope():
    basis = BesselCutoff(r_max=5.0, num_bessel=4, p=5)
    r = torch.tensor([0.7, 2.0, 4.9], dtype=torch.float64)
    n = torch.arange(1, 5, dtype=torch.float64)
    bessel = math.sqrt(2 / 5.0) * torch.sin(n * math.pi * r[:, None] / 5.0) / r[:, None]
    assert torch.allclose(basis(r), bessel * basis.envelope(r)[:, None])
    assert basis.envelope(torch.tensor([0.0], dtype=torch.float64)).item() == 1.0
    assert torch.all(basis.envelope(torch.tensor([5.0, 6.0, 100.0], dtype=torch.float64)) == 0)


def test_envelope_vanishes_smoothly_at_rmax():
    basis = BesselCutoff(r_max=4.0, num_bessel=8, p=5)
    r = torch.tensor([4.0 - 1e-9], dtype=torch.float64, requires_grad=True)
    f = basis.envelope(r)
    d1 = torch.autograd.grad(f.sum(), r, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), r)[0]
    assert abs(f.item()) < 1e-12 and abs(d1.item()) < 1e-12 and abs(d2.item()) < 1e-6
    # features decrease to zero: the radial MLP (no bias) then gives zero weights at r_max
    mlp = RadialMLP([8, 16, 12], torch.float64)
    assert torch.all(mlp(basis(torch.tensor([4.0], dtype=torch.float64))) == 0)


def test_normalized_silu_has_unit_second_moment():
    assert abs(SILU_NORM - 1.67653) < 1e-4
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(normalized_silu(z).pow(2).mean().item() - 1.0) < 5e-3


def test_radial_mlp_preserves_scale():
    torch.manual_seed(0)
    mlp = RadialMLP([10, 64, 64, 64, 32], torch.float64)
    x = torch.randn(4000, 10, dtype=torch.float64)
    second = mlp(x).pow(2).mean().item()
    assert 0.3 < second < 3.0
