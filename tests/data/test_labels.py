"""read_labels: where labels are found, renaming, shapes, stress conventions, total charge."""
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from foundation import keys
from foundation.data.labels import read_labels


def _atoms(n=3):
    rng = np.random.default_rng(0)
    return Atoms("H" * n, positions=rng.random((n, 3)) * 3)


def test_calculator_results():
    atoms = _atoms()
    forces = np.arange(9.0).reshape(3, 3)
    stress3 = np.array([[1.0, 0.4, 0.5], [0.4, 2.0, 0.6], [0.5, 0.6, 3.0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.25, forces=forces,
                                       stress=full_3x3_to_voigt_6_stress(stress3))
    labels = read_labels(atoms)
    assert labels[keys.ENERGY].shape == () and labels[keys.ENERGY] == -1.25
    np.testing.assert_array_equal(labels[keys.FORCES], forces)
    np.testing.assert_array_equal(labels[keys.STRESS], stress3)
    assert labels[keys.TOTAL_CHARGE] == 0.0 and keys.CHARGES not in labels
    assert all(v.dtype == np.float64 for v in labels.values())


def test_info_and_arrays_and_key_map():
    atoms = _atoms()
    atoms.info["REF_energy"] = 2.5
    atoms.info["my_energy"] = 7.0
    atoms.arrays["REF_forces"] = np.ones((3, 3))
    atoms.arrays["q"] = np.array([0.1, -0.2, 0.1])
    atoms.info["stress9"] = np.arange(9.0)
    atoms.info["charge"] = 1
    labels = read_labels(atoms)
    assert labels[keys.ENERGY] == 2.5 and labels[keys.FORCES].shape == (3, 3) and labels[keys.TOTAL_CHARGE] == 1.0
    labels = read_labels(atoms, {keys.ENERGY: "my_energy", keys.CHARGES: "q", keys.STRESS: "stress9"})
    assert labels[keys.ENERGY] == 7.0
    np.testing.assert_array_equal(labels[keys.CHARGES], [0.1, -0.2, 0.1])
    np.testing.assert_array_equal(labels[keys.STRESS], np.arange(9.0).reshape(3, 3))


def test_explicit_key_missing_is_key_error_naming_it():
    with pytest.raises(KeyError, match="dft_energy"):
        read_labels(_atoms(), {keys.ENERGY: "dft_energy"})


def test_wrong_sizes_are_value_errors():
    atoms = _atoms()
    atoms.info["forces"] = np.ones(4)
    with pytest.raises(ValueError, match="forces"):
        read_labels(atoms)
    atoms = _atoms()
    atoms.info["stress"] = np.ones(5)
    with pytest.raises(ValueError, match="stress"):
        read_labels(atoms)
