"""Labellers that ASE does not ship: ``PySCFCalculator`` (molecules, any PySCF method), named ``pyscf`` in a recipe's
``labeller: {calculator: pyscf, kwargs: {xc: pbe, basis: def2-svp}}``. The others (EMT, GFN2-xTB via tblite,
SevenNet-0, any ``module:ClassOrFactory``) are loaded by ``foundation.distill.teacher``."""
from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree


class PySCFCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) of a molecule by PySCF: Kohn-Sham DFT with functional ``xc`` (``"hf"``:
    Hartree-Fock), Gaussian ``basis``, total ``charge`` (e) and ``spin`` (2S; 0 = restricted, else unrestricted).
    A periodic structure or an unconverged SCF raises (the learn loop records the frame as failed to label)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, xc: str = "pbe", basis: str = "def2-svp", charge: int = 0, spin: int = 0,
                 max_cycle: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.xc, self.basis, self.charge, self.spin, self.max_cycle = xc, basis, int(charge), int(spin), max_cycle

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        from pyscf import dft, gto, scf
        if self.atoms.pbc.any():
            raise ValueError(f"PySCFCalculator labels molecules; {self.atoms.get_chemical_formula()} is periodic "
                             f"(pbc={self.atoms.pbc.tolist()})")
        mol = gto.M(atom=[(s, tuple(p)) for s, p in zip(self.atoms.get_chemical_symbols(), self.atoms.positions)],
                    unit="Angstrom", basis=self.basis, charge=self.charge, spin=self.spin, verbose=0)
        restricted = self.spin == 0
        if self.xc.lower() == "hf":
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if restricted else dft.UKS(mol)
            mf.xc = self.xc
        mf.max_cycle = self.max_cycle
        energy = mf.kernel()
        if not mf.converged:
            raise RuntimeError(f"PySCF SCF ({self.xc}/{self.basis}) did not converge in {self.max_cycle} cycles for "
                               f"{self.atoms.get_chemical_formula()}")
        gradient = np.asarray(mf.nuc_grad_method().kernel())   # Hartree/Bohr
        self.results = {"energy": float(energy) * Hartree, "free_energy": float(energy) * Hartree,
                        "forces": -gradient * Hartree / Bohr}
