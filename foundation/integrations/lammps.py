"""LAMMPS: the ML-IAP ``unified`` class over a TorchScript artifact (``foundation export torchscript``).

LAMMPS' ML-IAP package calls ``compute_forces(data)`` once per step with the neighbour data of one MPI rank:

- ``data.nlocal`` owned atoms (indices 0..nlocal-1; older builds expose only ``nlistatoms``), ``data.ntotal``
  owned + ghost atoms, ``data.elems`` (ntotal,) element index of every atom into ``element_types``;
- ``data.npairs`` pairs with ``data.pair_i`` (centre atom), ``data.pair_j`` (= ``jatoms``, the neighbour, possibly a
  ghost) and ``data.rij`` (npairs, 3) = x_j - x_i (Å), only pairs closer than 2 * ``rcutfac`` = r_max;
- written back: ``data.eatoms`` (nlistatoms,) per-atom energies (eV), ``data.energy`` (eV) and the pair forces by
  ``data.update_pair_forces(fij)``, which does f[pair_i] += fij, f[pair_j] -= fij and tallies the virial
  -sum rij (x) fij; ghost forces reach their owners by LAMMPS' reverse communication.

The model's graph is the set of all owned and ghost atoms with edges j -> i for every pair (vector x_i - x_j =
-rij); the energy is that of the owned atoms, and fij = dE/drij. A model with more than one layer needs the features
of ghost atoms, so LAMMPS must also give the pairs of ghost atoms (``pair_style mliap unified ... 1``: ghost
neighbours) with ghosts out to num_layers * r_max (``comm_modify cutoff``); otherwise ``compute_forces`` raises.
The long-range head needs the whole periodic structure and is refused. The class only imports torch (and lammps'
``MLIAPUnified`` base class when present); ``ndescriptors``/``nparams`` are 1 as LAMMPS requires a value.
"""
from __future__ import annotations

import json

import numpy as np
import torch

try:  # the base class of LAMMPS' Python package, when LAMMPS is installed with ML-IAP and Python
    from lammps.mliap.mliap_unified_abc import MLIAPUnified
except ImportError:  # pragma: no cover - depends on the environment
    class MLIAPUnified:  # noqa: D101 - the same attributes as LAMMPS' abstract class
        def __init__(self, interface=None, element_types=None, ndescriptors=None, nparams=None, rcutfac=None):
            self.interface, self.element_types = interface, element_types
            self.ndescriptors, self.nparams, self.rcutfac = ndescriptors, nparams, rcutfac

_SYMBOLS = ("X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb "
            "Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta "
            "W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs "
            "Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()


class FoundationMLIAP(MLIAPUnified):
    """``FoundationMLIAP("model.pt")``: the ML-IAP unified model of a TorchScript artifact (CPU, float64 forces).

    In a LAMMPS Python session: ``lammps.mliap.activate_mliappy(lmp)``, ``lammps.mliap.load_unified(
    FoundationMLIAP("model.pt"))``, then ``pair_style mliap unified EXISTS 1`` and ``pair_coeff * * Si O`` (the
    LAMMPS types' element symbols, from ``element_types``).
    """

    def __init__(self, artifact: str | torch.jit.ScriptModule):
        if isinstance(artifact, torch.jit.ScriptModule):
            model = artifact
        else:
            extra = {"foundation.json": ""}
            model = torch.jit.load(str(artifact), map_location="cpu", _extra_files=extra)
            if extra["foundation.json"] and json.loads(extra["foundation.json"]).get("long_range"):
                raise ValueError(f"{artifact}: the long-range head needs the whole periodic structure; LAMMPS' "
                                 "ML-IAP coupling is for short-range models only")
        numbers = list(model.atomic_numbers)
        super().__init__(None, [_SYMBOLS[z] for z in numbers], 1, 1, 0.5 * float(model.r_max))
        self.model = model
        self.num_layers = int(model.num_layers)
        self.numbers = torch.tensor(numbers, dtype=torch.long)

    def compute_descriptors(self, data) -> None:
        """Not used: the model has no separate descriptors."""

    def compute_gradients(self, data) -> None:
        """Not used: no parameter gradients in MD."""

    def compute_forces(self, data) -> None:
        """Energies of the owned atoms and pair forces, written into ``data`` (module docstring)."""
        nlocal = int(getattr(data, "nlocal", data.nlistatoms))
        ntotal, npairs = int(data.ntotal), int(data.npairs)
        eatoms = np.zeros(int(data.nlistatoms), dtype=np.float64)
        if nlocal == 0:
            data.eatoms, data.energy = eatoms, 0.0
            return
        pair_i, pair_j = _indices(data.pair_i, npairs), _indices(data.pair_j, npairs)
        rij = torch.as_tensor(np.asarray(data.rij, dtype=np.float64).reshape(npairs, 3)) if npairs \
            else torch.zeros(0, 3, dtype=torch.float64)
        self._check_ghost_pairs(pair_i, pair_j, nlocal, ntotal)
        numbers = self.numbers[torch.as_tensor(np.asarray(data.elems, dtype=np.int64))]
        energies, grad = self.model.pair_forces(numbers, -rij, pair_j, pair_i, nlocal)
        fij = np.ascontiguousarray((-grad).to(torch.float64).numpy())  # dE/drij = -dE/d(x_i - x_j)
        eatoms[:nlocal] = energies.to(torch.float64).numpy()
        data.eatoms = eatoms
        data.energy = float(eatoms[:nlocal].sum())
        data.update_pair_forces(fij)

    def _check_ghost_pairs(self, pair_i: torch.Tensor, pair_j: torch.Tensor, nlocal: int, ntotal: int) -> None:
        """A model with several layers needs the pairs of the ghost atoms next to owned atoms."""
        if self.num_layers < 2 or ntotal == nlocal:
            return
        near = torch.unique(pair_j[(pair_i < nlocal) & (pair_j >= nlocal)])
        centres = torch.unique(pair_i[pair_i >= nlocal])
        if near.numel() and not bool(torch.isin(near, centres).all()):
            raise ValueError(f"this model has {self.num_layers} message-passing layers: the ghost atoms next to "
                             f"owned atoms need their own neighbours. Use `pair_style mliap unified FILE 1` (ghost "
                             f"neighbours) and `comm_modify cutoff {self.num_layers * 2 * self.rcutfac + 1:.1f}` "
                             f"(num_layers * r_max + skin, Å)")


def _indices(values, count: int) -> torch.Tensor:
    """A LAMMPS int array (None when empty) as an int64 tensor of length ``count``."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(np.asarray(values, dtype=np.int64))
