"""Physics conformance checks shared by every model test (and usable on any trained model).

Each ``check_*`` evaluates a model on ``ase.Atoms`` (graphs built with ``from_atoms`` at the model's r_max),
raises ``AssertionError`` with the measured error when a property is violated, and returns the error.
Symmetry tolerances are relative to max(1, max |reference|), finite-difference ones to max |reference|;
pick ``tolerance(model)`` for symmetry checks (~1e-9 in float64, ~1e-4 in float32).
Finite-difference checks need a float64 model.
"""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from torch_geometric.data import Batch

from . import keys
from .data.graph import from_atoms

UNIMODULAR = np.array([[1, 1, 0], [0, 1, 0], [-1, 0, 1]]) @ np.array([[0, 1, 0], [1, 0, 0], [0, 1, 1]])  # det -1


def tolerance(model) -> float:
    """Symmetry tolerance for the model's dtype."""
    return 1e-9 if model.dtype == torch.float64 else 2e-4


def model_outputs(model, structures: list[Atoms], heads: list[int] | None = None, stress: bool = True) -> list[dict]:
    """Run ``model`` on the structures in one batch -> per structure {energy (), energies (n,), forces (n,3),
    stress (3,3)} as float64 numpy arrays."""
    heads = heads or [0] * len(structures)
    graphs = [from_atoms(a, model.config.r_max, head=h, with_labels=False, dtype=torch.float64)
              for a, h in zip(structures, heads)]
    out = model(Batch.from_data_list(graphs), compute_forces=True, compute_stress=stress)
    result, start = [], 0
    for k, atoms in enumerate(structures):
        n = len(atoms)
        item = {"energy": float(out[keys.ENERGY][k]),
                "energies": out[keys.NODE_ENERGY][start:start + n].double().cpu().numpy(),
                "forces": out[keys.FORCES][start:start + n].double().cpu().numpy()}
        if stress:
            item["stress"] = out[keys.STRESS][k].double().cpu().numpy()
        result.append(item)
        start += n
    return result


def _compare(what: str, got, ref, tol: float, floor: float = 1.0) -> float:
    """max |got - ref| / max(floor, max |ref|); floor=1 for symmetry checks, tiny for finite differences."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(got - ref))) / max(floor, float(np.max(np.abs(ref))) if ref.size else 1.0)
    if not np.isfinite(err) or err > tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}")
    return err


def _same(what: str, a: dict, b: dict, tol: float, forces_map=lambda f: f, stress_map=lambda s: s,
          perm=None) -> float:
    p = slice(None) if perm is None else perm
    errs = [_compare(f"{what} energy", b["energy"], a["energy"], tol),
            _compare(f"{what} forces", b["forces"], forces_map(a["forces"])[p], tol),
            _compare(f"{what} per-atom energies", b["energies"], a["energies"][p], tol)]
    if "stress" in a and "stress" in b:
        errs.append(_compare(f"{what} stress", b["stress"], stress_map(a["stress"]), tol))
    return max(errs)


def random_rotation(seed: int = 0, improper: bool = False) -> np.ndarray:
    """A random 3x3 rotation (det +1), or a rotoreflection (det -1) when ``improper``."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if improper else q


def check_rotation(model, atoms: Atoms, tol: float | None = None, seed: int = 0, improper: bool = False) -> float:
    """E invariant, forces rotate (F Q^T), stress rotates (Q S Q^T) when atoms and cell are rotated by Q."""
    q = random_rotation(seed, improper)
    moved = atoms.copy()
    moved.positions = atoms.positions @ q.T
    moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
    a, b = model_outputs(model, [atoms, moved])
    return _same("rotation", a, b, tol or tolerance(model), lambda f: f @ q.T, lambda s: q @ s @ q.T)


def check_translation(model, atoms: Atoms, tol: float | None = None, seed: int = 1) -> float:
    """Everything invariant under a rigid translation (periodic atoms are not wrapped)."""
    moved = atoms.copy()
    moved.positions = atoms.positions + np.random.default_rng(seed).normal(size=3) * 3.0
    a, b = model_outputs(model, [atoms, moved])
    return _same("translation", a, b, tol or tolerance(model))


def check_permutation(model, atoms: Atoms, tol: float | None = None, seed: int = 2) -> float:
    """E and stress invariant, forces and per-atom energies permuted with the atoms."""
    perm = np.random.default_rng(seed).permutation(len(atoms))
    a, b = model_outputs(model, [atoms, atoms[perm]])
    return _same("permutation", a, b, tol or tolerance(model), perm=perm)


def check_lattice_choice(model, atoms: Atoms, tol: float | None = None) -> float:
    """Periodic cell re-expressed with other lattice vectors (unimodular integer matrix, atoms wrapped into it)."""
    if not atoms.pbc.all():
        raise ValueError("check_lattice_choice needs a structure periodic along all three lattice vectors")
    moved = atoms.copy()
    moved.set_cell(UNIMODULAR @ atoms.cell.array, scale_atoms=False)
    moved.wrap()
    a, b = model_outputs(model, [atoms, moved])
    return _same("lattice vectors", a, b, tol or tolerance(model))


STENCIL = ((2, -1 / 12), (1, 8 / 12), (-1, -8 / 12), (-2, 1 / 12))  # 4th-order central difference: sum w f(x + k h) / h


def check_forces_fd(model, atoms: Atoms, step: float = 1e-3, tol: float = 1e-6, max_atoms: int = 4) -> float:
    """Forces vs 4th-order central finite differences of the energy (graphs rebuilt at every step), float64."""
    ref = model_outputs(model, [atoms], stress=False)[0]["forces"]
    rows = range(min(len(atoms), max_atoms))
    structures = []
    for i in rows:
        for x in range(3):
            for k, _ in STENCIL:
                moved = atoms.copy()
                moved.positions[i, x] += k * step
                structures.append(moved)
    outs = model_outputs(model, structures, stress=False)
    energies = np.array([r["energy"] for r in outs]).reshape(-1, 3, len(STENCIL))
    fd = -(energies @ np.array([w for _, w in STENCIL])) / step
    return _compare("forces vs finite differences", fd, ref[list(rows)], tol, floor=1e-12)


def check_stress_fd(model, atoms: Atoms, step: float = 1e-3, tol: float = 1e-6) -> float:
    """Stress vs 4th-order central differences of the energy under symmetric strain (pos, cell -> @ (I + eps))."""
    ref = model_outputs(model, [atoms])[0]["stress"]
    volume = abs(np.linalg.det(atoms.cell.array))
    structures = []
    for i in range(3):
        for j in range(3):
            for k, _ in STENCIL:
                strain = np.eye(3)
                strain[i, j] += k * step / 2
                strain[j, i] += k * step / 2
                moved = atoms.copy()
                moved.set_cell(atoms.cell.array @ strain, scale_atoms=False)
                moved.positions = atoms.positions @ strain
                structures.append(moved)
    outs = model_outputs(model, structures, stress=False)
    energies = np.array([r["energy"] for r in outs]).reshape(3, 3, len(STENCIL))
    fd = (energies @ np.array([w for _, w in STENCIL])) / step / volume
    return _compare("stress vs finite strain", fd, ref, tol, floor=1e-12)


def check_cutoff_smoothness(model, atoms: Atoms, tol: float = 1e-6, delta: float = 1e-7) -> tuple[float, float]:
    """Energy and force jumps (eV, eV/Å) as an extra atom crosses r_max of one atom (non-periodic ``atoms``).

    The extra atom (same element as its partner) is placed at r_max -/+ delta from one atom of the structure,
    on a line where every other atom is farther than r_max, so exactly one edge pair appears or disappears.
    """
    r_max = model.config.r_max
    anchor, point = _outside_point(atoms.positions, r_max)
    pair = []
    for r in (r_max - delta, r_max + delta):
        moved = atoms.copy()
        moved.append(atoms[anchor].symbol)
        moved.positions[-1] = atoms.positions[anchor] + r * point
        pair.append(moved)
    inside, outside = model_outputs(model, pair, stress=False)
    e_jump = abs(inside["energy"] - outside["energy"])
    f_jump = float(np.max(np.abs(inside["forces"] - outside["forces"])))
    if not (e_jump < tol and f_jump < tol):
        raise AssertionError(f"cutoff not smooth: energy jump {e_jump:.3e} eV, force jump {f_jump:.3e} eV/Å "
                             f"(tolerance {tol:.1e})")
    return e_jump, f_jump


def _outside_point(positions: np.ndarray, r_max: float) -> tuple[int, np.ndarray]:
    """(atom index, unit direction) such that atom + r_max * direction is > r_max + 0.1 Å from all other atoms."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for i in range(len(positions)):
        for d in directions:
            others = np.delete(positions, i, axis=0)
            if len(others) == 0 or np.linalg.norm(others - (positions[i] + r_max * d), axis=1).min() > r_max + 0.1:
                return i, d
    raise ValueError("found no place for an extra atom at r_max from exactly one atom; use a smaller molecule")


def check_batch_consistency(model, structures: list[Atoms], heads: list[int] | None = None,
                            tol: float | None = None) -> float:
    """A batch of several structures gives the same results as each structure evaluated alone."""
    heads = heads or [0] * len(structures)
    together = model_outputs(model, structures, heads)
    return max(_same(f"batch vs single #{k}", model_outputs(model, [atoms], [h])[0], together[k],
                     tol or tolerance(model)) for k, (atoms, h) in enumerate(zip(structures, heads)))


def check_isolated_atoms(model, tol: float | None = None) -> float:
    """Every element alone (no neighbours, with and without a large periodic box) gets exactly E0[head][element]."""
    cfg = model.config
    errs = []
    for h, head in enumerate(cfg.heads):
        for symbol, e0 in zip(cfg.elements, cfg.atomic_energies[head]):
            for atoms in (Atoms(symbol, positions=[[0.1, 0.2, 0.3]]),
                          Atoms(symbol, positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * (cfg.r_max + 1), pbc=True)):
                out = model_outputs(model, [atoms], [h])[0]
                errs.append(_compare(f"isolated {symbol} (head {head}) energy", out["energy"], e0,
                                     tol or tolerance(model)))
                errs.append(_compare(f"isolated {symbol} forces", out["forces"], np.zeros((1, 3)),
                                     tol or tolerance(model)))
    return max(errs)


def check_all(model, molecule: Atoms, crystal: Atoms, finite_differences: bool | None = None) -> dict[str, float]:
    """Every check on a molecule and a fully periodic crystal; finite differences only for float64 models.

    Returns {check name: measured error}.
    """
    fd = model.dtype == torch.float64 if finite_differences is None else finite_differences
    report = {"isolated": check_isolated_atoms(model),
              "batch": check_batch_consistency(model, [molecule, crystal]),
              "cutoff_energy_force": max(check_cutoff_smoothness(model, molecule, tol=1e-6 if fd else 1e-3))}
    for name, atoms in (("molecule", molecule), ("crystal", crystal)):
        report[f"{name}_rotation"] = check_rotation(model, atoms)
        report[f"{name}_reflection"] = check_rotation(model, atoms, improper=True, seed=3)
        report[f"{name}_translation"] = check_translation(model, atoms)
        report[f"{name}_permutation"] = check_permutation(model, atoms)
        if fd:
            report[f"{name}_forces_fd"] = check_forces_fd(model, atoms)
    report["crystal_lattice_choice"] = check_lattice_choice(model, crystal)
    if fd:
        report["crystal_stress_fd"] = check_stress_fd(model, crystal)
    return report
