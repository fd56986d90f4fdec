"""Neighbor lists against ASE's reference implementation; from_atoms / build_graph fields."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list
from torch_geometric.data import Batch

from foundation import keys
from foundation.data.graph import add_edges, build_graph, from_atoms, neighbor_list


def _pairs(i, j, shifts):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.rint(shifts).astype(int).tolist())))


def assert_matches_ase(atoms: Atoms, r_max: float) -> int:
    edge_index, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, r_max)
    i, j, S = ase_neighbor_list("ijS", atoms, r_max)
    assert _pairs(edge_index[0], edge_index[1], unit) == _pairs(i, j, S)
    np.testing.assert_array_equal(unit, np.rint(unit))  # integer lattice translations
    # sorted by receiver, then sender
    order = np.lexsort((edge_index[0], edge_index[1]))
    np.testing.assert_array_equal(order, np.arange(len(order)))
    # every edge is shorter than r_max, none is an atom with itself in the same image
    vec = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + unit @ atoms.cell.array
    assert np.all(np.linalg.norm(vec, axis=1) < r_max)
    assert not np.any((edge_index[0] == edge_index[1]) & ~unit.any(1))
    return edge_index.shape[1]


def _random_cell(rng, scale):
    while True:
        cell = rng.normal(size=(3, 3)) * scale
        cell[np.diag_indices(3)] += scale * 1.5
        if abs(np.linalg.det(cell)) > 0.3 * scale**3:
            return cell


@pytest.mark.parametrize("seed", range(6))
def test_random_skewed_cells(seed):
    rng = np.random.default_rng(seed)
    cell = _random_cell(rng, scale=rng.uniform(3.0, 7.0))
    n = int(rng.integers(4, 12))
    atoms = Atoms(numbers=rng.integers(1, 30, n), scaled_positions=rng.random((n, 3)), cell=cell, pbc=True)
    assert assert_matches_ase(atoms, r_max=rng.uniform(3.5, 5.5)) > 0


@pytest.mark.parametrize("seed", range(4))
def test_cells_smaller_than_cutoff_see_own_images(seed):
    rng = np.random.default_rng(100 + seed)
    cell = _random_cell(rng, scale=1.3)
    atoms = Atoms(numbers=[14] * int(rng.integers(1, 3)), cell=cell, pbc=True)
    atoms.set_scaled_positions(rng.random((len(atoms), 3)))
    r_max = 5.0
    assert_matches_ase(atoms, r_max)
    edge_index, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, r_max)
    self_images = (edge_index[0] == edge_index[1]) & unit.any(1)
    assert self_images.sum() > 10


def test_single_atom_simple_cubic_counts():
    atoms = Atoms("Cu", cell=np.eye(3) * 2.0, pbc=True)
    edge_index, unit = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 2.1)
    assert edge_index.shape[1] == 6  # the six nearest images at 2 Å
    assert sorted(map(tuple, unit.astype(int).tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)])


@pytest.mark.parametrize("pbc", [(True, True, False), (True, False, False), (False, True, True)])
def test_mixed_pbc_slabs(pbc):
    rng = np.random.default_rng(7)
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    atoms.rattle(0.05, seed=1)
    atoms.cell[0] += rng.normal(size=3) * 0.1 * np.array([1, 1, 0])
    atoms.pbc = pbc
    assert assert_matches_ase(atoms, 4.5) > 0


def test_slab_with_zero_vacuum_vector():
    atoms = Atoms("Cu4", positions=np.random.default_rng(3).random((4, 3)) * 3,
                  cell=[[3, 0, 0], [0.5, 3, 0], [0, 0, 0]], pbc=[True, True, False])
    assert_matches_ase(atoms, 5.0)


@pytest.mark.parametrize("name", ["CH3CH2OH", "C6H6", "H2O"])
def test_molecules(name):
    atoms = molecule(name)
    assert assert_matches_ase(atoms, 3.0) > 0
    atoms.center(vacuum=4.0)  # a cell, but no pbc: must be ignored
    assert_matches_ase(atoms, 3.0)


def test_periodic_axis_with_zero_length_is_an_error():
    with pytest.raises(ValueError, match="zero length"):
        neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), np.array([True, True, True]), 3.0)


def test_from_atoms_fields_shapes_and_units():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.02, seed=0)
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-3.5, forces=forces, stress=np.arange(6.0))
    atoms.info["charge"] = -1.0
    g = from_atoms(atoms, r_max=3.0, dtype=torch.float64, head=2, dataset_index=1)
    n = len(atoms)
    assert g.pos.shape == (n, 3) and g.pos.dtype == torch.float64
    assert g[keys.ATOMIC_NUMBERS].tolist() == [29] * n
    assert g[keys.CELL].shape == (1, 3, 3) and g[keys.PBC].tolist() == [[True] * 3]
    assert g[keys.ENERGY].tolist() == [-3.5] and g[keys.TOTAL_CHARGE].tolist() == [-1.0]
    np.testing.assert_array_equal(g[keys.FORCES].numpy(), forces)
    assert g[keys.STRESS].shape == (1, 3, 3) and g[keys.STRESS][0, 1, 2].item() == 3.0  # Voigt yz
    assert g[keys.HEAD].tolist() == [2] and g[keys.DATASET].tolist() == [1] and g[keys.NATOMS].tolist() == [n]
    # shifts are Cartesian (unit shifts @ cell) and reproduce edge lengths < r_max
    vec = g.pos[g.edge_index[1]] - g.pos[g.edge_index[0]] + g.shifts
    assert torch.all(vec.norm(dim=1) < 3.0) and g.edge_index.shape[1] == 12 * n
    g32 = from_atoms(atoms, r_max=3.0, dtype=torch.float32)
    assert g32.pos.dtype == torch.float32 and g32.shifts.dtype == torch.float32
    batch = Batch.from_data_list([g, g])
    assert batch[keys.ENERGY].shape == (2,) and batch[keys.STRESS].shape == (2, 3, 3)
    assert batch.edge_index.max().item() == 2 * n - 1


def test_build_graph_without_edges_then_add_edges_equals_from_atoms():
    atoms = molecule("CH4")
    g = build_graph(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, None, dtype=torch.float64)
    assert keys.EDGE_INDEX not in g
    add_edges(g, 2.0)
    ref = from_atoms(atoms, 2.0, dtype=torch.float64)
    assert torch.equal(g.edge_index, ref.edge_index) and torch.equal(g.shifts, ref.shifts)
    assert g.edge_index.shape[1] == 20  # 4 C-H pairs * 2 + 6 H-H pairs * 2 at 1.78 Å


def test_edges_do_not_depend_on_the_float_dtype():
    # a pair 1e-7 Å inside the cutoff: float32 positions could push it out; edges come from float64 inputs
    r_max = 3.0
    atoms = Atoms("Cu2", positions=[[0.1, 0.2, 0.3], [0.1 + r_max - 1e-7, 0.2, 0.3]])
    ref = from_atoms(atoms, r_max, dtype=torch.float64)
    assert ref.edge_index.shape[1] == 2
    for dtype in (torch.float32, torch.bfloat16):
        g = from_atoms(atoms, r_max, dtype=dtype)
        assert torch.equal(g.edge_index, ref.edge_index) and g.shifts.dtype == dtype


def _far_apart_list() -> tuple[list, list]:
    edges, unit = neighbor_list(np.array([[0, 0, 0], [1e6, 0, 0], [0, 1.5, 0]]), np.zeros((3, 3)), [False] * 3, 5.0)
    return edges.tolist(), unit.tolist()


def test_atoms_1e6_angstrom_apart_give_a_correct_list_not_sigfpe():
    """Regression (issue 18.9): vesin's cell list died with SIGFPE (exit -8) on this geometry; run in a child."""
    from forked import run_forked
    code, result = run_forked(_far_apart_list)
    assert code == 0, f"the neighbour list killed its process (exit {code})"
    assert result == ([[2, 0], [0, 2]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("seed", range(3))
def test_groups_far_apart_match_ase(seed):
    """Molecules 10^5-10^6 Å apart (free, slab and wire boundary conditions) give exactly ASE's pairs."""
    rng = np.random.default_rng(300 + seed)
    parts = [molecule(name).positions + rng.uniform(-1e6, 1e6, 3) for name in ("H2O", "CH4", "C6H6")]
    positions = np.concatenate(parts)
    numbers = np.concatenate([molecule(n).numbers for n in ("H2O", "CH4", "C6H6")])
    for pbc, cell in (([False] * 3, np.zeros((3, 3))), ([True, True, False], np.diag([7.0, 8.0, 0.0])),
                      ([True, False, False], np.diag([6.0, 0.0, 0.0]))):
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        assert assert_matches_ase(atoms, r_max=4.0) > 0


def test_cell_too_elongated_for_the_cell_list_is_a_named_error():
    """A periodic cell that would leave vesin's cell list with zero bins along a direction raises ValueError."""
    with pytest.raises(ValueError, match="cell too elongated for the neighbor list"):
        neighbor_list(np.array([[0, 0, 0], [5.0, 0, 0]]), np.diag([2e6, 10.0, 10.0]), [True] * 3, 5.0)
    # a long but workable cell still gives its pairs
    edges, _ = neighbor_list(np.array([[0, 0, 0], [3.0, 0, 0]]), np.diag([1e6, 10.0, 10.0]), [True] * 3, 5.0)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 1), (1, 0)]


def test_non_finite_positions_are_a_named_error():
    with pytest.raises(ValueError, match="must be finite"):
        neighbor_list(np.array([[0, 0, 0], [np.nan, 0, 0]]), np.zeros((3, 3)), [False] * 3, 5.0)
