"""Teachers: labels from ASE calculators (finite-difference H v) and from FoundationModels (autograd H v)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

from foundation import keys
from foundation.distill.teacher import (
    CalculatorTeacher,
    ModelTeacher,
    load_teacher,
    pack_vectors,
    random_unit_vectors,
    unpack_vectors,
)


class Quadratic(Calculator):
    """E = 1/2 x^T A x + b.x (x = flattened positions, Å) with a fixed random SPD A (eV/Å²): H = A exactly."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, natoms: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((3 * natoms, 3 * natoms))
        self.a = m @ m.T / natoms + np.eye(3 * natoms)
        self.b = rng.standard_normal(3 * natoms)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        x = self.atoms.positions.reshape(-1)
        self.results = {"energy": 0.5 * x @ self.a @ x + self.b @ x, "forces": -(self.a @ x + self.b).reshape(-1, 3)}


class SavedModelCalculator:
    """Factory importable as 'module:Name': the FoundationCalculator of a saved model directory (float64)."""

    def __new__(cls, path: str):
        from foundation import FoundationCalculator
        return FoundationCalculator.from_pretrained(path, dtype="float64")


def tiny_model(seed: int = 0):
    from foundation import FoundationModel, ModelConfig
    torch.manual_seed(seed)
    config = ModelConfig.preset("small", elements=["Cu", "Ni"], num_channels=8, max_L=1, r_max=4.5, num_bessel=6,
                                radial_mlp=[16, 16], avg_num_neighbors=20.0, scale={"default": 5.0},
                                dtype="float64")
    return FoundationModel(config)


def cuni(seed: int = 1, reps=(2, 1, 1)) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(reps)
    atoms.numbers[::3] = 28
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model().save_pretrained(tmp_path_factory.mktemp("teacher") / "model")


def test_vectors_are_unit_deterministic_per_structure_and_packing_round_trips():
    a, b = cuni(1), cuni(2)
    v = random_unit_vectors(a, 3, seed=5)
    assert v.shape == (len(a), 3, 3)
    np.testing.assert_allclose(np.linalg.norm(v.reshape(-1, 3), axis=0), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(v, random_unit_vectors(a.copy(), 3, seed=5))
    assert not np.allclose(v, random_unit_vectors(a, 3, seed=6))
    assert not np.allclose(v, random_unit_vectors(b, 3, seed=5))
    packed = pack_vectors(v)
    assert packed.shape == (len(a), 9)
    np.testing.assert_array_equal(packed[:, 3:6], v[:, :, 1])  # columns 3j..3j+2 = vector j
    np.testing.assert_array_equal(unpack_vectors(packed), v)
    t = torch.from_numpy(v)
    assert torch.equal(pack_vectors(t), torch.from_numpy(packed))
    assert torch.equal(unpack_vectors(pack_vectors(t)), t)
    # the vectors of a structure do not depend on what else is labelled with it
    teacher = load_teacher({"calculator": "ase.calculators.emt:EMT"})
    alone = teacher.label([b], hvp_vectors=2, seed=3)[0]
    together = teacher.label([a, b], hvp_vectors=2, seed=3)[1]
    np.testing.assert_array_equal(alone[keys.HESSIAN_VECTORS], together[keys.HESSIAN_VECTORS])


def test_finite_difference_hvp_is_exact_for_a_quadratic_potential():
    atoms = Atoms("Cu5", positions=np.random.default_rng(0).uniform(0, 3, (5, 3)))
    teacher = load_teacher({"calculator": f"{__name__}:Quadratic", "kwargs": {"natoms": 5, "seed": 3}})
    assert isinstance(teacher, CalculatorTeacher)
    rec = teacher.label([atoms], hvp_vectors=4, seed=0)[0]
    a = Quadratic(5, seed=3).a
    v = unpack_vectors(rec[keys.HESSIAN_VECTORS])
    hv = unpack_vectors(rec[keys.HESSIAN_PRODUCTS])
    for j in range(4):
        np.testing.assert_allclose(hv[:, :, j].reshape(-1), a @ v[:, :, j].reshape(-1), rtol=0, atol=1e-8)
    x = atoms.positions.reshape(-1)
    np.testing.assert_allclose(rec[keys.FORCES].reshape(-1), -(a @ x + Quadratic(5, seed=3).b), atol=1e-12)
    assert keys.STRESS not in rec  # not periodic
    assert rec[keys.ENERGY].shape == () and rec[keys.HESSIAN_PRODUCTS].shape == (5, 12)


def test_finite_difference_hvp_matches_autograd_of_the_same_model(model_dir):
    atoms = cuni(3)
    fd = load_teacher({"calculator": f"{__name__}:SavedModelCalculator", "kwargs": {"path": str(model_dir)}})
    ad = load_teacher({"model": str(model_dir)})
    assert isinstance(ad, ModelTeacher)
    r_fd, r_ad = fd.label([atoms], hvp_vectors=3, seed=1)[0], ad.label([atoms], hvp_vectors=3, seed=1)[0]
    assert set(r_fd) == set(r_ad) == {keys.ENERGY, keys.FORCES, keys.STRESS, keys.HESSIAN_VECTORS,
                                      keys.HESSIAN_PRODUCTS}
    np.testing.assert_array_equal(r_fd[keys.HESSIAN_VECTORS], r_ad[keys.HESSIAN_VECTORS])
    scale = np.abs(r_ad[keys.HESSIAN_PRODUCTS]).max()
    assert scale > 1e-2  # a non-trivial product
    np.testing.assert_allclose(r_fd[keys.HESSIAN_PRODUCTS], r_ad[keys.HESSIAN_PRODUCTS], atol=1e-5 * scale)
    for k in (keys.ENERGY, keys.FORCES, keys.STRESS):
        np.testing.assert_allclose(r_fd[k], r_ad[k], atol=1e-10)


def test_emt_hvp_is_symmetric_and_converged_in_the_step():
    atoms = cuni(4, reps=(2, 2, 1))
    u, v = random_unit_vectors(atoms, 1, 0), random_unit_vectors(atoms, 1, 1)
    vecs = [np.concatenate([u, v], axis=2)]
    hv = {h: unpack_vectors(load_teacher({"calculator": "ase.calculators.emt:EMT", "hvp_step": h})
                            .label([atoms], hvp_vectors=vecs)[0][keys.HESSIAN_PRODUCTS]) for h in (1e-3, 4e-3)}
    h1 = hv[1e-3]
    scale = np.abs(h1).max()
    # u.(H v) = v.(H u) for the exact Hessian; FD errors are O(h^2)
    assert abs(np.sum(u[..., 0] * h1[..., 1]) - np.sum(v[..., 0] * h1[..., 0])) < 1e-5 * scale
    np.testing.assert_allclose(h1, hv[4e-3], atol=1e-4 * scale)
    # H v equals the change of -forces along v (a larger displacement, first order)
    emt = load_teacher({"calculator": "ase.calculators.emt:EMT"})
    f0 = emt.label([atoms])[0][keys.FORCES]
    moved = atoms.copy()
    moved.positions += 1e-4 * v[..., 0]
    df = -(emt.label([moved])[0][keys.FORCES] - f0) / 1e-4
    np.testing.assert_allclose(df, h1[..., 1], atol=2e-3 * scale)


def test_model_teacher_matches_the_model_and_batches_consistently(model_dir):
    from torch_geometric.data import Batch

    from foundation import FoundationCalculator
    from foundation.data import from_atoms
    frames = [cuni(5), cuni(6, reps=(1, 1, 1)), Atoms("CuNi2", positions=[[0, 0, 0], [2.3, 0, 0], [0, 2.4, 0.2]])]
    one = load_teacher({"model": str(model_dir), "max_atoms": 1})  # one structure per batch
    many = load_teacher({"model": str(model_dir)})
    r1, rn = one.label(frames, hvp_vectors=2, seed=0), many.label(frames, hvp_vectors=2, seed=0)
    calc = FoundationCalculator.from_pretrained(str(model_dir), dtype="float64")
    for atoms, a, b in zip(frames, r1, rn):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-10, err_msg=k)
        atoms = atoms.copy()
        atoms.calc = calc
        np.testing.assert_allclose(a[keys.ENERGY], atoms.get_potential_energy(), atol=1e-10)
        np.testing.assert_allclose(a[keys.FORCES], atoms.get_forces(), atol=1e-10)
        assert (keys.STRESS in a) == bool(atoms.pbc.all())
    model = tiny_model()
    g = from_atoms(frames[0], model.config.r_max, with_labels=False, dtype=torch.float64)
    v = torch.from_numpy(unpack_vectors(rn[0][keys.HESSIAN_VECTORS]))
    hv = model.hessian_vector_product(Batch.from_data_list([g]), v)
    np.testing.assert_allclose(pack_vectors(hv.numpy()), rn[0][keys.HESSIAN_PRODUCTS], atol=1e-10)


def test_dtype_and_head_options_of_a_model_teacher(model_dir):
    atoms = cuni(7)
    f64 = load_teacher({"model": str(model_dir)}).label([atoms], hvp_vectors=1)[0]
    t32 = load_teacher({"model": str(model_dir), "dtype": "float32", "head": "default"})
    assert t32.model.dtype == torch.float32 and t32.calculator.dtype == torch.float32
    f32 = t32.label([atoms], hvp_vectors=1)[0]
    for k in f64:
        assert f32[k].dtype == np.float64
        np.testing.assert_allclose(f32[k], f64[k], rtol=1e-4, atol=1e-5 * np.abs(f64[k]).max(), err_msg=k)
    assert not np.array_equal(f32[keys.FORCES], f64[keys.FORCES])
    with pytest.raises(ValueError, match="not one of"):
        load_teacher({"model": str(model_dir), "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="unknown head 'pbe'"):
        load_teacher({"model": str(model_dir), "head": "pbe"})


def test_description_names_the_weights_and_changes_with_them(tmp_path, model_dir):
    other = tiny_model(seed=1).save_pretrained(tmp_path / "other")
    a, b = load_teacher({"model": str(model_dir)}), load_teacher({"model": str(other)})
    assert a.describe()["kind"] == "foundation" and "@weights:" in a.revision
    assert a.revision != b.revision and a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_teacher({"model": str(model_dir)}).fingerprint()
    emt = load_teacher({"calculator": "ase.calculators.emt:EMT", "name": "EMT"})
    import ase
    assert emt.describe() == {"kind": "calculator", "name": "EMT", "revision": f"ase {ase.__version__}",
                              "spec": {"calculator": "ase.calculators.emt:EMT", "name": "EMT"}}
    assert emt.fingerprint() != load_teacher({"calculator": "ase.calculators.emt:EMT", "hvp_step": 2e-3}).fingerprint()


@pytest.mark.parametrize("spec, match", [
    ({}, "exactly one of"),
    ({"model": "x", "calculator": "a:b"}, "exactly one of"),
    ({"calculator": "ase.calculators.emt:EMT", "kwarg": {}}, "unknown keys \\['kwarg'\\]"),
    ({"calculator": "ase.calculators.emt.EMT"}, "module.path:ClassName"),
    ({"calculator": "no_such_pkg_xyz.calc:Calc"}, "pip install no_such_pkg_xyz"),
    ({"calculator": "ase.calculators.emt:Nope"}, "has no 'Nope'"),
    ({"calculator": f"{__name__}:Quadratic", "kwargs": {}}, "could not be created"),
    ({"calculator": "ase.calculators.emt:EMT", "hvp_step": 0}, "hvp_step must be > 0"),
    ({"calculator": "ase.calculators.emt:EMT", "kwargs": {"x": object()}}, "must be plain JSON"),
])
def test_bad_specs_are_refused_with_a_message(spec, match):
    with pytest.raises(ValueError, match=match):
        load_teacher(spec)


def test_missing_model_and_bad_vectors_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_teacher({"model": str(tmp_path / "nope")})
    emt = load_teacher({"calculator": "ase.calculators.emt:EMT"})
    atoms = cuni()
    with pytest.raises(ValueError, match="expected \\(8, 3, k\\)"):
        emt.label([atoms], hvp_vectors=[np.zeros((7, 3, 1))])
    with pytest.raises(ValueError, match="one each"):
        emt.label([atoms, atoms], hvp_vectors=[np.zeros((8, 3, 1))])
    with pytest.raises(ValueError, match=">= 0"):
        emt.label([atoms], hvp_vectors=-1)
    squashed = atoms.copy()
    squashed.positions[1] = squashed.positions[0]
    with pytest.raises(ValueError, match="non-finite"):
        load_teacher({"calculator": f"{__name__}:Exploding"}).label([squashed])


class Exploding(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": np.nan, "forces": np.zeros((len(self.atoms), 3))}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sevenn") is None, reason="sevenn is not installed")
def test_sevennet_teacher_labels_silicon_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    teacher = load_teacher({"calculator": "sevenn.calculator:SevenNetCalculator",
                            "kwargs": {"model": "7net-0", "device": "cpu"}})
    assert teacher.revision.startswith("sevenn ")
    perfect = bulk("Si", "diamond", a=5.43)
    rattled = bulk("Si", "diamond", a=5.43, cubic=True)
    rattled.rattle(0.05, seed=0)
    r0, r1 = teacher.label([perfect, rattled], hvp_vectors=2, seed=0)
    assert -5.6 < r0[keys.ENERGY] / 2 < -5.2  # PBE cohesive scale of diamond Si (eV/atom, total energy)
    assert np.abs(r0[keys.FORCES]).max() < 1e-3  # symmetric site: no force
    # PBE's lattice constant of Si is 5.47 Å: at 5.43 Å the cell is compressed (ASE sign: negative stress)
    np.testing.assert_allclose(r0[keys.STRESS], np.trace(r0[keys.STRESS]) / 3 * np.eye(3), atol=1e-6)
    assert -0.03 < np.trace(r0[keys.STRESS]) / 3 < 0
    np.testing.assert_allclose(r1[keys.FORCES].sum(0), 0, atol=1e-4)
    hv, v = unpack_vectors(r1[keys.HESSIAN_PRODUCTS]), unpack_vectors(r1[keys.HESSIAN_VECTORS])
    # v.H v > 0 near a minimum and u.H v = v.H u (float32 teacher: loose tolerance)
    assert np.sum(v[..., 0] * hv[..., 0]) > 0 and np.sum(v[..., 1] * hv[..., 1]) > 0
    cross = np.sum(v[..., 0] * hv[..., 1]), np.sum(v[..., 1] * hv[..., 0])
    assert abs(cross[0] - cross[1]) < 0.02 * np.abs(hv).max()


_HUB_TEACHER = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from ase.build import bulk
from test_teacher import tiny_model
from foundation.distill.teacher import load_teacher
atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
atoms.rattle(0.05, seed=1)
sha1 = tiny_model(seed=1).push_to_hub("org/teacher")
sha2 = tiny_model(seed=2).push_to_hub("org/teacher")
pinned = load_teacher({{"model": "org/teacher", "revision": sha1}})
latest = load_teacher({{"model": "org/teacher"}})
local = load_teacher({{"model": str(tiny_model(seed=1).save_pretrained({work!r}))}})
f = [t.label([atoms], hvp_vectors=1)[0]["hvp"].tolist() for t in (pinned, latest, local)]
print("RESULT" + json.dumps(dict(sha1=sha1, sha2=sha2, rev1=pinned.revision, rev2=latest.revision,
                                 rev_local=local.revision, hvp=f)))
"""


@pytest.mark.slow
def test_teacher_from_the_hub_is_pinned_to_a_revision(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from foundation.hubserver import serve_in_thread
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "test-token",
           "OMP_NUM_THREADS": "1"}
    code = _HUB_TEACHER.format(tests=str(Path(__file__).resolve().parent), work=str(tmp_path / "local"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["rev1"].startswith(res["sha1"] + "@weights:") and res["rev2"].startswith(res["sha2"] + "@weights:")
    assert res["rev_local"].startswith("local@weights:") and res["rev_local"].split("@")[1] == res["rev1"].split("@")[1]
    assert res["hvp"][0] == res["hvp"][2] and res["hvp"][0] != res["hvp"][1]
