"""The demo corpus generator: real labels from EMT and GFN2-xTB, deterministic, converted with a manifest."""
import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT

from foundation import keys
from foundation.data import ShardedDataset
from foundation.data.generate import generate, metal_structures, molecular_structures

pytest.importorskip("tblite")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    return generate("tiny", out, seed=3)


def test_parts_are_converted_datasets_with_manifests(corpus):
    assert set(corpus) == {"metals", "molecules", "heldout"}
    for path in corpus.values():
        manifest = json.loads((path / "manifest.json").read_text())
        ds = ShardedDataset(path, r_max=5.0)
        assert len(ds) == manifest["num_structures"] > 0
        assert manifest["level_of_theory"] in ("EMT (ASE)", "GFN2-xTB (tblite)")
    metal_elements = set(json.loads((corpus["metals"] / "manifest.json").read_text())["elements"])
    assert metal_elements <= {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"} and len(metal_elements) >= 5
    assert set(json.loads((corpus["heldout"] / "manifest.json").read_text())["elements"]) == {"Cu", "Au"}


def test_metal_labels_are_emt(corpus):
    ds = ShardedDataset(corpus["metals"], r_max=5.0, dtype=__import__("torch").float64)
    for i in range(0, len(ds), 7):
        d = ds[i]

        atoms = Atoms(numbers=d[keys.ATOMIC_NUMBERS].numpy(), positions=d[keys.POSITIONS].numpy(),
                      cell=d[keys.CELL][0].numpy(), pbc=d[keys.PBC][0].numpy())
        atoms.calc = EMT()
        assert d[keys.ENERGY].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(d[keys.FORCES].numpy(), atoms.get_forces(), atol=1e-9)
        if atoms.pbc.all():
            np.testing.assert_allclose(d[keys.STRESS][0].numpy(), atoms.get_stress(voigt=False), atol=1e-9)
        else:
            assert keys.STRESS not in d or bool(d[keys.STRESS].isnan().all())


def test_molecule_charges_sum_to_total_charge(corpus):
    ds = ShardedDataset(corpus["molecules"], r_max=5.0)
    charges = {int(round(ds[i][keys.TOTAL_CHARGE].item())) for i in range(len(ds))}
    assert 0 in charges
    for i in range(len(ds)):
        d = ds[i]
        assert d[keys.CHARGES].sum().item() == pytest.approx(d[keys.TOTAL_CHARGE].item(), abs=1e-4)
        assert d[keys.DIPOLE].shape == (1, 3)


def test_generation_is_deterministic_per_seed():
    a = [atoms.get_potential_energy() for atoms in metal_structures(5, seed=11)]
    b = [atoms.get_potential_energy() for atoms in metal_structures(5, seed=11)]
    c = [atoms.get_potential_energy() for atoms in metal_structures(5, seed=12)]
    assert a == b and a != c
    m1 = [atoms.positions.sum() for atoms in molecular_structures(3, seed=1)]
    m2 = [atoms.positions.sum() for atoms in molecular_structures(3, seed=1)]
    assert m1 == m2


def test_unknown_preset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        generate("huge", tmp_path)


@pytest.mark.slow
def test_demo_preset_metals_generate_through():
    """Every configuration kind the demo preset draws (incl. alloys where all atoms were substituted)."""
    from foundation.data.generate import PRESETS
    n = 0
    for atoms in metal_structures(PRESETS["demo"].metals, seed=0):
        assert np.isfinite(atoms.get_potential_energy())
        n += 1
    assert n == PRESETS["demo"].metals
