"""MixedDataset, NaN-filling collate and the resumable loader (in memory, with workers, and over real shards)."""
import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import write
from torch.utils.data import Dataset

from foundation import keys
from foundation.data import from_atoms
from foundation.data.loader import MixedDataset, collate, make_loader
from foundation.data.sampling import AtomBudgetBatchSampler, ConcatArray

R_MAX = 3.0


def _labelled(atoms, seed, stress):
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    atoms.get_forces()
    if stress:
        atoms.get_stress()
    return atoms


def _crystals(n=12):
    out = []
    for i in range(n):
        a = bulk(["Cu", "Al", "Ni"][i % 3], "fcc", a=3.6 + 0.02 * i, cubic=True).repeat((1 + i % 2, 1, 1 + i % 3 // 2))
        out.append(_labelled(a, i, stress=True))
    return out


def _molecules(n=15):
    names = ["H2O", "CH4", "NH3", "C2H6", "CH3OH"]
    return [_labelled(molecule(names[i % 5]), 100 + i, stress=False) for i in range(n)]


class ListDataset(Dataset):
    """Graphs in memory with the dataset interface the sampler needs (``natoms``)."""

    def __init__(self, atoms_list, noise=False):
        self.items = [from_atoms(a, R_MAX, dtype=torch.float64) for a in atoms_list]
        self.natoms = np.array([d.num_nodes for d in self.items], np.int32)
        self.noise = noise

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        data = self.items[i]
        if self.noise:                                   # an "augmentation" drawn from the worker's numpy RNG
            data = data.clone()
            data["noise"] = torch.tensor([np.random.random()])
        return data


@pytest.fixture(scope="module")
def parts():
    return ListDataset(_crystals()), ListDataset(_molecules())


def test_mixed_dataset_indexes_tags_and_leaves_inputs_alone(parts):
    crystals, molecules = parts
    mixed = MixedDataset([crystals, molecules], temperature=2.0, names=["bulk", "mol"], heads=[3, 5])
    assert len(mixed) == 27 and mixed.locate(12) == (1, 0) and mixed.locate(-1) == (1, 14)
    assert isinstance(mixed.natoms, ConcatArray)
    assert np.array_equal(np.asarray(mixed.natoms), np.concatenate([crystals.natoms, molecules.natoms]))
    p = np.sqrt([12, 15]) / np.sqrt([12, 15]).sum()
    assert np.allclose(mixed.probabilities, p)
    item = mixed[13]
    assert item[keys.DATASET].tolist() == [1] and item[keys.HEAD].tolist() == [5]
    assert torch.equal(item[keys.POSITIONS], molecules[1][keys.POSITIONS])
    assert molecules[1][keys.DATASET].tolist() == [0] and molecules[1][keys.HEAD].tolist() == [0]   # unchanged
    assert mixed[2][keys.DATASET].tolist() == [0] and mixed[2][keys.HEAD].tolist() == [3]
    with pytest.raises(IndexError, match="27"):
        mixed[27]
    with pytest.raises(ValueError, match="one head index per dataset"):
        MixedDataset([crystals, molecules], heads=[0])
    sampler = AtomBudgetBatchSampler.from_dataset(MixedDataset([crystals, molecules], weights=[1, 3]), 40,
                                                  samples_per_epoch=40)
    flat = np.concatenate(list(sampler))
    assert np.array_equal(np.bincount((flat >= 12).astype(int)), [10, 30])


def test_collate_fills_missing_labels_with_nan(parts):
    crystals, molecules = parts
    items = [crystals[0], molecules[0], crystals[1], molecules[1]]
    items[2] = items[2].clone()
    items[2][keys.CHARGES] = torch.linspace(-0.5, 0.5, items[2].num_nodes, dtype=torch.float64)
    batch = collate(items)
    n = [d.num_nodes for d in items]
    assert batch[keys.STRESS].shape == (4, 3, 3)
    assert torch.isnan(batch[keys.STRESS][[1, 3]]).all() and not torch.isnan(batch[keys.STRESS][[0, 2]]).any()
    assert torch.allclose(batch[keys.STRESS][0], crystals[0][keys.STRESS][0])
    charges = batch[keys.CHARGES]
    assert charges.shape == (sum(n),) and charges.dtype == torch.float64
    start = n[0] + n[1]
    assert torch.equal(charges[start:start + n[2]], items[2][keys.CHARGES])
    missing = torch.ones(sum(n), dtype=torch.bool)
    missing[start:start + n[2]] = False
    assert torch.isnan(charges[missing]).all()
    assert not torch.isnan(batch[keys.FORCES]).any() and batch[keys.ENERGY].shape == (4,)
    tagged = [d.clone() for d in items]
    for d, tag in zip(tagged, [0, 1, 0, 1]):
        d[keys.DATASET] = torch.tensor([tag])
    assert collate(tagged)[keys.DATASET].tolist() == [0, 1, 0, 1]   # not offset by atom counts like edge_index
    assert keys.STRESS not in molecules[0] and keys.CHARGES not in crystals[1]          # inputs untouched
    odd = molecules[2].clone()
    odd["spin"] = torch.zeros(1)
    with pytest.raises(ValueError, match="'spin'"):
        collate([molecules[0], odd])


def _signature(batch):
    """What identifies a batch's structures: their energies (eV) and atom counts."""
    return batch[keys.ENERGY].tolist(), batch[keys.NATOMS].tolist()


def test_loader_yields_budgeted_mixed_batches(parts):
    mixed = MixedDataset(list(parts))
    sampler = AtomBudgetBatchSampler.from_dataset(mixed, max_atoms=40, seed=0)
    loader = make_loader(mixed, sampler)
    seen = []
    for batch in loader:
        assert int(batch[keys.NATOMS].sum()) <= 40 and batch.num_graphs == len(batch[keys.ENERGY])
        assert batch[keys.STRESS].shape == (batch.num_graphs, 3, 3)
        is_mol = batch[keys.DATASET] == 1
        assert torch.isnan(batch[keys.STRESS][is_mol]).all() and not torch.isnan(batch[keys.STRESS][~is_mol]).any()
        seen += batch[keys.ENERGY].tolist()
    assert len(seen) == len(mixed) == len(set(seen))
    with pytest.raises(ValueError, match="dataset has"):
        make_loader(parts[0], sampler)


def test_loader_with_workers_resumes_at_the_next_consumed_batch(parts):
    """Workers prefetch ahead; the loader's state counts batches the loop consumed. Worker RNG is reproducible."""
    data = MixedDataset([ListDataset(_crystals(), noise=True), ListDataset(_molecules(), noise=True)])

    def loader():
        return make_loader(data, AtomBudgetBatchSampler.from_dataset(data, 30, seed=4), num_workers=2,
                           persistent_workers=True, prefetch_factor=4)

    ref = loader()
    epochs = []
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        epochs.append([(_signature(b), b["noise"].tolist()) for b in ref])
    assert [n for _, n in epochs[0]] != [n for _, n in epochs[1]]          # new worker seeds each epoch
    run = loader()
    run.set_epoch(1)
    it = iter(run)
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 3)                     # not 3 + prefetched batches
    assert [(_signature(b), b["noise"].tolist()) for b in got] == epochs[1][:3]
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert [(_signature(b), b["noise"].tolist()) for b in resumed] == epochs[1][3:]
    resumed.set_epoch(0)
    assert [(_signature(b), b["noise"].tolist()) for b in resumed] == epochs[0]


def test_batch_randomness_is_per_batch_and_leaves_the_main_rng_alone():
    data = ListDataset(_molecules(), noise=True)
    sampler = AtomBudgetBatchSampler.from_dataset(data, 20, seed=2)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    first = [b["noise"].tolist() for b in make_loader(data, sampler)]
    assert np.random.random() == before                  # num_workers=0: training RNG not consumed or reseeded
    assert first == [b["noise"].tolist() for b in make_loader(data, sampler)]
    assert len({x for n in first for x in n}) == len(data)


def _sharded(tmp_path, name, atoms_list):
    from foundation.data.convert import convert
    write(tmp_path / f"{name}.xyz", atoms_list, format="extxyz")
    return convert([tmp_path / f"{name}.xyz"], tmp_path / name, shard_size=5, progress=False)


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_sharded_datasets_mixed_through_two_workers(tmp_path, context):
    dataset_module = pytest.importorskip("foundation.data.dataset")
    crystals, molecules = _crystals(), _molecules()
    shards = [dataset_module.ShardedDataset(_sharded(tmp_path, n, a), r_max=R_MAX, dtype=torch.float64)
              for n, a in (("bulk", crystals), ("mol", molecules))]
    mixed = MixedDataset(shards, weights=[1, 1], heads=[0, 1])
    sampler = AtomBudgetBatchSampler.from_dataset(mixed, 48, samples_per_epoch=30, seed=1)
    # read in the main process first: its LMDB environments are open when the workers start
    expected = [collate([mixed[i] for i in b]) for b in sampler]
    loader = make_loader(mixed, sampler, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    assert len(batches) == len(expected) > 1
    for got, want in zip(batches, expected):
        for key in (keys.ENERGY, keys.FORCES, keys.STRESS, keys.POSITIONS, keys.EDGE_INDEX, keys.HEAD, keys.DATASET):
            assert torch.equal(got[key].isnan(), want[key].isnan()) if got[key].is_floating_point() else True
            assert torch.allclose(torch.nan_to_num(got[key].double()), torch.nan_to_num(want[key].double()))
    counts = np.bincount(np.concatenate([b[keys.DATASET].numpy() for b in batches]), minlength=2)
    assert counts.tolist() == [15, 15]
    ref = from_atoms(molecules[0], R_MAX, dtype=torch.float64)
    first_mol = mixed[len(crystals)]
    assert torch.allclose(first_mol[keys.FORCES], ref[keys.FORCES]) and keys.STRESS not in first_mol
