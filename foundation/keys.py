"""Every field name used on a PyG ``Data``/``Batch`` and in model outputs.

Units are ASE's: Å, eV, eV/Å, eV/Å³ (stress sign as in ASE: positive = tensile), elementary charge e.
Shapes use n = atoms in the structure (or batch), E = edges, B = structures in a batch.
A label a structure does not have is absent from its record; when structures with and without a label are
batched together the missing entries are filled with NaN (``MISSING``) and the loss masks them out.
"""

# --- structure -------------------------------------------------------------------------------------------
POSITIONS = "pos"                    # (n, 3) float, Å, Cartesian
ATOMIC_NUMBERS = "atomic_numbers"    # (n,) int64
CELL = "cell"                        # (1, 3, 3) float, Å, rows are lattice vectors (ASE); zeros if no cell
PBC = "pbc"                          # (1, 3) bool, periodic along each lattice vector
NATOMS = "natoms"                    # (1,) int64, atoms in the structure
TOTAL_CHARGE = "total_charge"        # (1,) float, e
HEAD = "head"                        # (1,) int64, index of the readout head for this structure
DATASET = "dataset"                  # (1,) int64, which dataset of a mixture the structure came from

# --- graph (neighbor list, built with the model's r_max) --------------------------------------------------
# Full (both directions) list of pairs closer than r_max, self-pairs in the same image excluded, sorted by
# receiver. Edge vector r = pos[edge_index[1]] - pos[edge_index[0]] + shifts (receiver's periodic image).
# Messages flow sender -> receiver. Same convention as ASE's neighbor_list("ijS"): i = sender, j = receiver.
EDGE_INDEX = "edge_index"            # (2, E) int64, [0] = sender, [1] = receiver
SHIFTS = "shifts"                    # (E, 3) float, Å, = unit_shifts @ cell
UNIT_SHIFTS = "unit_shifts"          # (E, 3) float, integer lattice translations (not stored on Data by default)

# --- labels (and the same names for predictions) ---------------------------------------------------------
ENERGY = "energy"                    # (1,) float, eV, total energy of the structure (B,) in a batch
FORCES = "forces"                    # (n, 3) float, eV/Å
STRESS = "stress"                    # (1, 3, 3) float, eV/Å³, ASE sign; (B, 3, 3) in a batch
CHARGES = "charges"                  # (n,) float, e, per-atom (partial or latent) charges
DIPOLE = "dipole"                    # (1, 3) float, e·Å
HESSIAN_VECTORS = "hvp_vectors"      # (n, 3 * k) float, unit vectors v for Hessian-vector labels
HESSIAN_PRODUCTS = "hvp"             # (n, 3 * k) float, eV/Å², H @ v for each of the k vectors

# --- model outputs only ----------------------------------------------------------------------------------
NODE_ENERGY = "energies"             # (n,) float, eV, per-atom energies (references included)
VIRIALS = "virials"                  # (B, 3, 3) float, eV, = -stress * volume
CHARGE_EXCESS = "charge_excess"      # (B,) float, e, sum of the raw latent charges - total charge (long-range
                                     # head): what the total-charge constraint removed; a loss property, target 0
ENERGY_UNCERTAINTY = "energy_uncertainty"   # (B,) float, eV, committee spread of the energy (learn/committee)
FORCES_UNCERTAINTY = "forces_uncertainty"   # (n,) float, eV/Å, committee spread of each atom's force
MAX_DEVI_F = "max_devi_f"                   # (B,) float, eV/Å, max over atoms of the force spread (DP-GEN)

LABEL_KEYS = (ENERGY, FORCES, STRESS, CHARGES, DIPOLE, HESSIAN_VECTORS, HESSIAN_PRODUCTS)
PER_ATOM_KEYS = (FORCES, CHARGES, HESSIAN_VECTORS, HESSIAN_PRODUCTS)
PER_STRUCTURE_KEYS = (ENERGY, STRESS, DIPOLE)

UNITS = {
    ENERGY: "eV", FORCES: "eV/Å", STRESS: "eV/Å^3", CHARGES: "e", DIPOLE: "e*Å", TOTAL_CHARGE: "e",
    CHARGE_EXCESS: "e", POSITIONS: "Å", CELL: "Å", HESSIAN_PRODUCTS: "eV/Å^2", HESSIAN_VECTORS: "1",
}

MISSING = float("nan")
