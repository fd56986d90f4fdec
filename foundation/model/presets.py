"""Named model presets.

small / medium / large are MACE-MP-0's architectures (ACEsuit/mace-mp ``mace_mp_0/*.sh``): 128 channels,
hidden L = 0 / 1 / 2, 2 layers, correlation 3, max_ell 3, r_max 6 Å, 10 Bessel functions, p = 5, radial MLP
[64, 64, 64], 16-unit readout. With the 89 MP elements they have 3,847,696 / 4,688,656 / 5,725,072 parameters.

student: a fast model for distillation (a student is trained on one system and its teacher's labels, so it
needs far less capacity than a universal model):

- L = 0 (invariant features): no l > 0 hidden features, so the convolution has 4 paths instead of 10-17 and
  the product basis has a single (scalar) output;
- 64 channels: every GEMM (radial MLP output, linear maps, per-element skip) costs 4x less than at 128;
- correlation 2 (3-body features) with max_ell 2: 9 + 45 product-basis monomials instead of 16 + 136 + 816;
- r_max 5 Å: (5/6)^3 = 0.58x the edges of r_max 6, and edges dominate the cost;
- 2 layers are kept so that the receptive field (10 Å) still covers medium-range effects; 8 Bessel functions.
"""
from __future__ import annotations

from typing import Any

_MP0 = dict(r_max=6.0, num_channels=128, max_ell=3, num_layers=2, correlation=3, num_bessel=10,
            num_poly_cutoff=5, radial_mlp=[64, 64, 64], readout_mlp=16)

PRESETS: dict[str, dict[str, Any]] = {
    "small": {**_MP0, "max_L": 0},
    "medium": {**_MP0, "max_L": 1},
    "large": {**_MP0, "max_L": 2},
    "student": dict(r_max=5.0, num_channels=64, max_L=0, max_ell=2, num_layers=2, correlation=2, num_bessel=8,
                    num_poly_cutoff=5, radial_mlp=[64, 64, 64], readout_mlp=16),
}


def preset_fields(name: str) -> dict[str, Any]:
    """A copy of the fields of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name].items()}
