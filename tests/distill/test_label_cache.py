"""Teacher-label cache: LMDB shards readable by ShardedDataset, reused, resumable, keyed by what made them."""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from foundation import keys
from foundation.data import ShardedDataset, collate
from foundation.distill import label_cache
from foundation.distill.label_cache import build_label_cache, is_complete, label_frames
from foundation.distill.structures import ConfigurationSettings, generate_configurations, select_disagreeing
from foundation.distill.teacher import load_teacher, unpack_vectors

EMT = {"calculator": "ase.calculators.emt:EMT"}
LABELS = (keys.ENERGY, keys.FORCES, keys.STRESS, keys.HESSIAN_VECTORS, keys.HESSIAN_PRODUCTS)


def seeds():
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    b = bulk("Ni", "fcc", a=3.52, cubic=True).repeat((2, 1, 1))
    b.numbers[::3] = 29
    return [a, b]


def settings(**kw) -> ConfigurationSettings:
    return ConfigurationSettings(**{"temperatures": [300, 600], "md_steps": 6, "md_interval": 3, **kw})


class Counting:
    """Wraps ``teacher.label`` to count calls (and fail on call ``fail_at``)."""

    def __init__(self, teacher, fail_at: int | None = None):
        self.calls, self.fail_at, self._label = 0, fail_at, teacher.label
        teacher.label = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return self._label(*args, **kwargs)


def records(directory):
    ds = ShardedDataset(directory)
    return [ds.record(i) for i in range(len(ds))]


def test_cache_holds_the_teacher_labels_and_is_reused(tmp_path, monkeypatch):
    teacher = load_teacher(EMT)
    count = Counting(teacher)
    out = build_label_cache(teacher, seeds(), settings(), tmp_path, hvp_vectors=2, seed=4, shard_size=5, log=None)
    frames = generate_configurations(seeds(), load_teacher(EMT).calculator, settings())
    assert count.calls == -(-len(frames) // 5) == 4
    ds = ShardedDataset(out, r_max=4.0)
    assert len(ds) == len(frames) == 18 and ds.manifest["num_structures"] == 18
    expected = load_teacher(EMT).label(frames, hvp_vectors=2, seed=4)
    for i, (frame, ref) in enumerate(zip(frames, expected)):
        rec = ds.record(i)
        np.testing.assert_array_equal(rec[keys.POSITIONS], frame.positions)  # float64, bit for bit
        np.testing.assert_array_equal(rec[keys.CELL], frame.cell.array)
        for k in LABELS:
            np.testing.assert_array_equal(rec[k], ref[k], err_msg=k)
    item = ds[7]
    assert item[keys.HESSIAN_PRODUCTS].shape == (len(frames[7]), 6) and item[keys.STRESS].shape == (1, 3, 3)
    info = json.loads((out / label_cache.FRAMES_NAME).read_text())
    assert info["config_type"] == [f.info["config_type"] for f in frames]
    assert info["temperature_K"] == [f.info["temperature_K"] for f in frames]
    manifest = ds.manifest
    assert manifest["provenance"]["teacher"] == teacher.describe()
    assert set(manifest["properties"]) == set(LABELS)
    assert manifest["properties"][keys.HESSIAN_PRODUCTS] == {"unit": "eV/Å^2", "per_atom": True}
    assert manifest["statistics"]["force_rms"] > 0 and set(manifest["statistics"]["reference_energies"]) == {"Cu", "Ni"}
    # second run: no MD, no labelling, same directory
    monkeypatch.setattr(label_cache, "generate_configurations", lambda *a, **k: pytest.fail("MD was re-run"))
    again = load_teacher(EMT)
    recount = Counting(again)
    assert build_label_cache(again, seeds(), settings(), tmp_path, hvp_vectors=2, seed=4, shard_size=5,
                             log=None) == out
    assert recount.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".lock"]
    # another cutoff for the student: statistics are recomputed from the shards, the teacher is not called
    build_label_cache(again, seeds(), settings(), tmp_path, hvp_vectors=2, seed=4, shard_size=5, r_max=3.0, log=None)
    stats = ShardedDataset(out).manifest["statistics"]
    assert recount.calls == 0 and stats["r_max"] == 3.0
    assert stats["avg_num_neighbors"] < manifest["statistics"]["avg_num_neighbors"]


def test_key_changes_with_teacher_seeds_settings_and_label_options(tmp_path):
    teacher = load_teacher(EMT)
    base = dict(hvp_vectors=1, seed=0, log=None)
    first = build_label_cache(teacher, seeds(), settings(md_steps=0), tmp_path, **base)
    assert build_label_cache(load_teacher(EMT), seeds(), settings(md_steps=0), tmp_path, **base) == first
    moved = seeds()
    moved[1].positions[0, 0] += 1e-9
    variants = [
        build_label_cache(teacher, moved, settings(md_steps=0), tmp_path, **base),
        build_label_cache(teacher, seeds(), settings(md_steps=0, seed=1), tmp_path, **base),
        build_label_cache(teacher, seeds(), settings(md_steps=0), tmp_path, **{**base, "hvp_vectors": 2}),
        build_label_cache(teacher, seeds(), settings(md_steps=0), tmp_path, **{**base, "seed": 1}),
        build_label_cache(load_teacher({**EMT, "hvp_step": 2e-3}), seeds(), settings(md_steps=0), tmp_path, **base),
    ]
    assert len({first, *variants}) == 6
    assert ShardedDataset(variants[2])[0][keys.HESSIAN_VECTORS].shape[1] == 6


def test_killed_run_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    teacher = load_teacher(EMT)
    Counting(teacher, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        build_label_cache(teacher, seeds(), settings(), tmp_path / "a", shard_size=4, log=None)
    partial = next((tmp_path / "a").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["configurations.lmdb", "shard-00000.lmdb",
                                                         "shard-00001.lmdb"]
    monkeypatch.setattr(label_cache, "generate_configurations", lambda *a, **k: pytest.fail("MD was re-run"))
    resumed = load_teacher(EMT)
    count = Counting(resumed)
    out = build_label_cache(resumed, seeds(), settings(), tmp_path / "a", shard_size=4, log=None)
    assert count.calls == 5 - 2 and not partial.exists() and not (out / "configurations.lmdb").exists()
    monkeypatch.undo()
    clean = build_label_cache(load_teacher(EMT), seeds(), settings(), tmp_path / "b", shard_size=4, log=None)
    for x, y in zip(records(out), records(clean), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_damaged_cache_is_rebuilt(tmp_path):
    out = build_label_cache(load_teacher(EMT), seeds(), settings(md_steps=0), tmp_path, log=None)
    key = json.loads((out / "manifest.json").read_text())["provenance"]["cache_key"]
    assert is_complete(out, key) and not is_complete(out, "0" * 64)
    shard = out / "shard-00000.lmdb"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert not is_complete(out, key)
    teacher = load_teacher(EMT)
    count = Counting(teacher)
    assert build_label_cache(teacher, seeds(), settings(md_steps=0), tmp_path, log=None) == out
    assert count.calls == 1 and is_complete(out, key)


def test_on_policy_frames_are_labelled_and_cached(tmp_path):
    frames = generate_configurations(seeds(), None, settings(md_steps=0, rattle_copies=3))
    student = [np.random.default_rng(i).normal(0, 0.1 * (i % 4), (len(f), 3)) for i, f in enumerate(frames)]
    picked = select_disagreeing(frames, student, [np.zeros((len(f), 3)) for f in frames], k=3)
    teacher = load_teacher(EMT)
    count = Counting(teacher)
    out = label_frames(teacher, picked, tmp_path, hvp_vectors=1, log=None)
    assert label_frames(teacher, picked, tmp_path, hvp_vectors=1, log=None) == out and count.calls == 1
    assert label_frames(teacher, picked[:2], tmp_path, hvp_vectors=1, log=None) != out
    recs = records(out)
    assert len(recs) == 3
    info = json.loads((out / label_cache.FRAMES_NAME).read_text())
    assert info["config_type"] == [f.info["config_type"] for f in picked]
    student_md = label_frames(teacher, [seeds()[1]], tmp_path, hvp_vectors=0, log=None)  # no info: from MD
    assert json.loads((student_md / label_cache.FRAMES_NAME).read_text())["config_type"] == ["onpolicy"]
    for rec, frame in zip(recs, picked):
        np.testing.assert_array_equal(rec[keys.POSITIONS], frame.positions)
        assert rec[keys.HESSIAN_PRODUCTS].shape == (len(frame), 3)
    with pytest.raises(ValueError, match="no frames"):
        label_frames(teacher, [], tmp_path)


def test_stored_hvp_matches_the_models_hvp_on_a_collated_batch(tmp_path):
    from test_teacher import tiny_model
    model = tiny_model(seed=2)
    teacher = load_teacher({"model": str(model.save_pretrained(tmp_path / "model"))})
    out = build_label_cache(teacher, seeds(), settings(md_steps=0, rattle_copies=1, strain_copies=0),
                            tmp_path / "cache", hvp_vectors=2, log=None)
    ds = ShardedDataset(out, r_max=model.config.r_max, dtype=torch.float64)
    batch = collate([ds[i] for i in range(len(ds))])  # structures of 4 and 8 atoms in one batch
    assert batch[keys.HESSIAN_VECTORS].shape == (24, 6)
    hv = model.hessian_vector_product(batch, unpack_vectors(batch[keys.HESSIAN_VECTORS]))
    np.testing.assert_allclose(hv.numpy(), unpack_vectors(batch[keys.HESSIAN_PRODUCTS].numpy()), atol=1e-10)
    pred = model(batch, compute_stress=True)
    np.testing.assert_allclose(pred[keys.FORCES].numpy(), batch[keys.FORCES].numpy(), atol=1e-10)
    np.testing.assert_allclose(pred[keys.STRESS].numpy(), batch[keys.STRESS].numpy(), atol=1e-12)


def test_concurrent_builders_label_once(tmp_path):
    teachers = [load_teacher(EMT), load_teacher(EMT)]
    counts = [Counting(t) for t in teachers]
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = build_label_cache(teachers[i], seeds(), settings(), tmp_path, shard_size=8, log=None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1]
    assert sorted(c.calls for c in counts) == [0, 3]


DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sevenn") is None, reason="sevenn is not installed")
def test_sevennet_labels_mlearn_silicon_seeds_close_to_dft(tmp_path, monkeypatch):
    path = DATA / "mlearn" / "Si_train.xyz.xz"
    from foundation.data.readers import read_atoms
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    frames = read_atoms(path)
    seeds = [a for a in frames if len(a) <= 16]  # the three small surface cells (12-16 atoms)
    assert len(seeds) == 3
    dft = [a.get_forces() for a in seeds]
    spec = {"calculator": "sevenn.calculator:SevenNetCalculator", "kwargs": {"model": "7net-0", "device": "cpu"}}
    s = ConfigurationSettings(md_steps=0, rattle_copies=1, strain_copies=1)
    out = build_label_cache(load_teacher(spec), seeds, s, tmp_path, hvp_vectors=1, log=None)
    ds = ShardedDataset(out)
    assert len(ds) == 9 and ds.manifest["elements"] == ["Si"]
    teacher_forces = [ds.record(3 * i)[keys.FORCES] for i in range(3)]  # the seeds themselves
    mae = np.mean([np.abs(t - d).mean() for t, d in zip(teacher_forces, dft)])
    assert mae < 0.15  # SevenNet-0 vs the mlearn PBE forces (0.13 eV/Å MAE on the whole Si test set)
    again = load_teacher(spec)
    count = Counting(again)
    assert build_label_cache(again, seeds, s, tmp_path, hvp_vectors=1, log=None) == out and count.calls == 0
