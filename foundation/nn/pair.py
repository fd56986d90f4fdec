"""Short-range pieces of mace-torch's newer families: the Agnesi distance transform and ZBL pair repulsion.

Agnesi transform (ACEpotentials.jl, JCP 159, 044118 (2023); MACE-MP-0b/0b2/0b3, MACE-OMAT-0): with
r_0 = (R_cov(z_i) + R_cov(z_j)) / 2 and y = r / r_0,
    T(r) = 1 / (1 + a y^q / (1 + y^(q - p)))
is fed to the Bessel basis instead of r (the polynomial cutoff still sees r).

ZBL (Ziegler-Biersack-Littmark universal screened nuclear repulsion), per directed edge j -> i:
    V_ij = 0.5 * 14.3996 Z_i Z_j / r * sum_k c_k exp(-d_k r / a_ij) * f_p(r / (R_cov(z_i) + R_cov(z_j)))
with a_ij = a_prefactor * 0.529 / (Z_i^a_exp + Z_j^a_exp) Å, d = (3.2, 0.9423, 0.4028, 0.2016) and f_p the
polynomial envelope; V_ij is added to atom i (each pair appears as two directed edges). Energies eV, lengths Å.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ZBL_EXPONENTS = (3.2, 0.9423, 0.4028, 0.2016)
COULOMB = 14.3996  # e^2 / (4 pi eps0) in eV Å, mace-torch's rounded value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _radii(value, num_elements: int, name: str) -> None:
    _check(isinstance(value, list) and len(value) == num_elements and all(
        isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in value),
        f"{name}['covalent_radii'] must list one positive radius (Å) per element ({num_elements}), got {value!r}")


def check_distance_transform(spec: dict | None, num_elements: int) -> None:
    """Validate ``ModelConfig.distance_transform``: None or {"kind": "agnesi", q, p, a, covalent_radii}."""
    if spec is None:
        return
    _check(isinstance(spec, dict) and spec.get("kind") == "agnesi",
           f"distance_transform must be None or a dict with kind 'agnesi', got {spec!r}")
    for key in ("q", "p", "a"):
        _check(isinstance(spec.get(key), (int, float)) and math.isfinite(spec[key]),
               f"distance_transform[{key!r}] must be a finite number, got {spec.get(key)!r}")
    _radii(spec.get("covalent_radii"), num_elements, "distance_transform")


def check_pair_repulsion(spec: dict | None, num_elements: int) -> None:
    """Validate ``ModelConfig.pair_repulsion``: None or {"kind": "zbl", p, a_exp, a_prefactor, c, covalent_radii}."""
    if spec is None:
        return
    _check(isinstance(spec, dict) and spec.get("kind") == "zbl",
           f"pair_repulsion must be None or a dict with kind 'zbl', got {spec!r}")
    for key in ("p", "a_exp", "a_prefactor"):
        _check(isinstance(spec.get(key), (int, float)) and math.isfinite(spec[key]),
               f"pair_repulsion[{key!r}] must be a finite number, got {spec.get(key)!r}")
    c = spec.get("c")
    _check(isinstance(c, list) and len(c) == 4 and all(isinstance(v, (int, float)) for v in c),
           f"pair_repulsion['c'] must be 4 screening coefficients, got {c!r}")
    _radii(spec.get("covalent_radii"), num_elements, "pair_repulsion")


class AgnesiTransform(nn.Module):
    """Edge lengths (E,) Å and element indices of sender/receiver (E,) -> transformed lengths (E,)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.q, self.p, self.a = float(spec["q"]), float(spec["p"]), float(spec["a"])
        self.register_buffer("radii", torch.tensor(spec["covalent_radii"], dtype=torch.float64), persistent=False)

    def forward(self, r: torch.Tensor, z_send: torch.Tensor, z_recv: torch.Tensor) -> torch.Tensor:
        r0 = 0.5 * (self.radii[z_send] + self.radii[z_recv]).to(r.dtype)
        y = r / r0
        return 1.0 / (1.0 + self.a * y.pow(self.q) / (1.0 + y.pow(self.q - self.p)))


def polynomial_envelope(x: torch.Tensor, p: float) -> torch.Tensor:
    """f_p(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x < 1, else 0."""
    f = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p) + p * (p + 2.0) * x.pow(p + 1) - p * (p + 1.0) / 2.0 * x.pow(p + 2)
    return f * (x < 1.0).to(x.dtype)


class ZBLRepulsion(nn.Module):
    """Per-atom ZBL energies (n,) eV from edge lengths (E,) Å, receiver (E,), atomic numbers of both ends."""

    def __init__(self, spec: dict):
        super().__init__()
        self.p, self.a_exp, self.a_prefactor = float(spec["p"]), float(spec["a_exp"]), float(spec["a_prefactor"])
        self.c = [float(v) for v in spec["c"]]
        self.register_buffer("radii", torch.tensor(spec["covalent_radii"], dtype=torch.float64), persistent=False)

    def forward(self, r: torch.Tensor, receiver: torch.Tensor, num_nodes: int, z_send: torch.Tensor,
                z_recv: torch.Tensor, number_send: torch.Tensor, number_recv: torch.Tensor) -> torch.Tensor:
        """z_*: element indices (E,); number_*: atomic numbers (E,) as the length dtype."""
        a = self.a_prefactor * 0.529 / (number_send.pow(self.a_exp) + number_recv.pow(self.a_exp))
        x = r / a
        phi = sum(c * torch.exp(-d * x) for c, d in zip(self.c, ZBL_EXPONENTS))
        r_max = (self.radii[z_send] + self.radii[z_recv]).to(r.dtype)
        v = 0.5 * COULOMB * number_send * number_recv / r * phi * polynomial_envelope(r / r_max, self.p)
        return torch.zeros(num_nodes, dtype=r.dtype, device=r.device).index_add(0, receiver, v)
