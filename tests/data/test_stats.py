"""Dataset statistics: least-squares reference energies, neighbor counts, force RMS, per-atom energy."""
import numpy as np
from ase.neighborlist import neighbor_list as ase_neighbor_list
from data_helpers import emt_frames

from foundation import keys
from foundation.data.stats import StatsAccumulator, fit_reference_energies, statistics_from_manifest


def _synthetic(rng, count=60):
    e0 = {1: -13.6, 6: -1025.3, 8: -2035.6, 29: -3.7}
    numbers, energies = [], []
    for _ in range(count):
        z = rng.choice(list(e0), size=int(rng.integers(2, 12)))
        numbers.append(z)
        energies.append(sum(e0[int(x)] for x in z) + rng.normal(scale=0.01) * len(z))
    return e0, numbers, energies


def test_reference_energies_recover_the_generating_values():
    rng = np.random.default_rng(0)
    e0, numbers, energies = _synthetic(rng)
    fitted = fit_reference_energies(numbers, energies)
    assert set(fitted) == set(e0)
    for z in e0:
        assert abs(fitted[z] - e0[z]) < 0.02
    # identical to a direct least-squares solve on the composition matrix
    zs = sorted(e0)
    a = np.array([[np.sum(n == z) for z in zs] for n in numbers], dtype=float)
    direct = np.linalg.lstsq(a, np.array(energies), rcond=None)[0]
    np.testing.assert_allclose([fitted[z] for z in zs], direct, rtol=0, atol=1e-8)


def test_accumulated_statistics_match_direct_computation():
    frames = emt_frames(12, seed=3)
    acc = StatsAccumulator(r_max=4.0)
    halves = [StatsAccumulator(r_max=4.0), StatsAccumulator(r_max=4.0)]
    for k, atoms in enumerate(frames):
        labels = {keys.ENERGY: np.float64(atoms.get_potential_energy()), keys.FORCES: atoms.get_forces()}
        acc.update_structure(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, labels)
        halves[k % 2].update_structure(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, labels)
    res = acc.result()
    edges = sum(len(ase_neighbor_list("i", a, 4.0)) for a in frames)
    atoms_total = sum(len(a) for a in frames)
    assert res["avg_num_neighbors"] == edges / atoms_total
    f = np.concatenate([a.get_forces() for a in frames])
    np.testing.assert_allclose(res["force_rms"], np.sqrt(np.mean(f**2)), rtol=1e-12)
    refs = {z: v for z, v in fit_reference_energies([a.numbers for a in frames],
                                                    [a.get_potential_energy() for a in frames]).items()}
    per_atom = np.array([(a.get_potential_energy() - sum(refs[int(z)] for z in a.numbers)) / len(a) for a in frames])
    np.testing.assert_allclose(res["energy_per_atom_mean"], per_atom.mean(), atol=1e-9)
    np.testing.assert_allclose(res["energy_per_atom_std"], per_atom.std(), atol=1e-7)
    merged = halves[0].merge(halves[1]).result()
    for k in ("avg_num_neighbors", "force_rms", "energy_per_atom_mean"):
        np.testing.assert_allclose(merged[k], res[k], rtol=1e-10, atol=1e-12)


def test_rank_deficient_fit_reports_rank_and_reproduces_energies():
    # every structure has the same stoichiometry: only the composition-weighted sum is determined
    numbers = [np.array([1, 1, 8])] * 5
    energies = [-2076.0 + 0.01 * k for k in range(5)]
    acc = StatsAccumulator(r_max=None)
    for n, e in zip(numbers, energies):
        acc.update(n, {keys.ENERGY: np.float64(e)})
    res = acc.result()
    assert res["e0_rank"] == 1 and res["avg_num_neighbors"] is None and res["force_rms"] is None
    refs = res["reference_energies"]
    np.testing.assert_allclose(2 * refs["H"] + refs["O"], np.mean(energies), atol=1e-8)
    assert abs(res["energy_per_atom_mean"]) < 1e-9
    stats = statistics_from_manifest({"statistics": res})
    assert set(stats["e0s"]) == {1, 8} and stats["energy_shift"] == res["energy_per_atom_mean"]
