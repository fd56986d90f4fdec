"""Mixed datasets, collation with NaN-filled missing labels, and the resumable DataLoader.

Typical use::

    data = MixedDataset([omat, spice], temperature=2.0, heads=[0, 1])
    sampler = AtomBudgetBatchSampler.from_dataset(data, max_atoms=4096, seed=0)   # rank/world from torch.distributed
    loader = make_loader(data, sampler, num_workers=4)
    loader.load_state_dict(checkpoint["loader"])                                   # when resuming
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...                        # batch: torch_geometric Batch
            checkpoint["loader"] = loader.state_dict()  # counts batches consumed, not prefetched
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_geometric.data import Batch, Data

from .. import keys
from .sampling import AtomBudgetBatchSampler, ConcatArray, mixing_probabilities


class MixedDataset(Dataset):
    """Several datasets behind one index space: global index i -> (dataset d, local index).

    Each dataset needs ``__len__``, ``__getitem__`` -> ``Data`` and ``natoms`` ((n_d,) atoms per structure).
    Items get ``keys.DATASET`` = d and, when ``heads`` (one head index per dataset) is given, ``keys.HEAD``.
    ``natoms`` is a lazy ``ConcatArray`` (no copy, no per-structure objects). ``probabilities`` (D,) follow
    explicit ``weights`` or temperature T (p_d ∝ n_d^(1/T)); default proportional to size.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float] | None = None, temperature: float | None = None,
                 names: Sequence[str] | None = None, heads: Sequence[int] | None = None):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        for d, ds in enumerate(self.datasets):
            if not hasattr(ds, "natoms") or len(ds.natoms) != len(ds):
                raise ValueError(f"dataset {d} ({type(ds).__name__}) needs a `natoms` array with one entry per "
                                 f"structure ({len(ds)})")
        self.names = list(names) if names is not None else [getattr(ds, "name", f"dataset{d}")
                                                             for d, ds in enumerate(self.datasets)]
        if len(self.names) != len(self.datasets):
            raise ValueError(f"{len(self.names)} names for {len(self.datasets)} datasets")
        if heads is not None and len(heads) != len(self.datasets):
            raise ValueError(f"{len(heads)} heads for {len(self.datasets)} datasets; give one head index per dataset")
        self.heads = None if heads is None else [int(h) for h in heads]
        self.dataset_sizes = np.asarray([len(ds) for ds in self.datasets], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.dataset_sizes)]).astype(np.int64)
        self.probabilities = mixing_probabilities(self.dataset_sizes, weights, temperature)
        self.natoms = ConcatArray([ds.natoms for ds in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, local index) of global ``index``."""
        i = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} structures")
        d = int(np.searchsorted(self.offsets, i, "right")) - 1
        return d, i - int(self.offsets[d])

    def __getitem__(self, index: int) -> Data:
        d, local = self.locate(index)
        data = copy.copy(self.datasets[d][local])  # shallow: never alter the wrapped dataset's objects
        data[keys.DATASET] = torch.tensor([d], dtype=torch.long)
        if self.heads is not None:
            data[keys.HEAD] = torch.tensor([self.heads[d]], dtype=torch.long)
        return data


def collate(data_list: Sequence[Data]) -> Batch:
    """``Batch.from_data_list`` after filling labels some structures lack with NaN (``keys.MISSING``).

    A missing per-atom label gets shape (n, *trailing) and a per-structure one (1, *trailing), trailing shape and
    dtype copied from a structure that has it; so batch["stress"] is (B,3,3) with NaN rows where stress is unknown.
    """
    if not data_list:
        raise ValueError("cannot collate an empty list of structures")
    present: dict[str, torch.Tensor] = {}
    for data in data_list:
        for key in data.keys():
            present.setdefault(key, data[key])
    filled = []
    for i, data in enumerate(data_list):
        missing = [k for k in present if k not in data]
        if missing:
            data = copy.copy(data)
            for key in missing:
                data[key] = _nan_like(present[key], key, data, i)
        filled.append(data)
    return Batch.from_data_list(filled)


def _nan_like(example: torch.Tensor, key: str, data: Data, i: int) -> torch.Tensor:
    if key in keys.PER_ATOM_KEYS:
        shape = (int(data.num_nodes), *example.shape[1:])
    elif key in keys.PER_STRUCTURE_KEYS:
        shape = (1, *example.shape[1:])
    else:
        raise ValueError(f"structure {i} of the batch lacks field {key!r}, which others have, and {key!r} is not a "
                         f"label that can be filled with NaN; give every structure {key!r} (or none)")
    if not example.is_floating_point():
        raise ValueError(f"label {key!r} has integer dtype {example.dtype}; labels must be floating point")
    return torch.full(shape, keys.MISSING, dtype=example.dtype, device=example.device)


def _seed(seed: int, *words: int) -> int:
    """A 63-bit seed derived from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _WorkerInit:
    """Seed numpy and ``random`` in a worker from its torch seed (base seed of the epoch + worker id), then run
    the user's ``worker_init_fn``. A class, not a closure, so it pickles under the spawn start method."""

    def __init__(self, user_fn: Callable | None):
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        seed = torch.initial_seed()
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class _SeededIndices(list):
    """One batch of dataset indices plus the RNG seed its structures are built with."""
    seed: int | None = None


class _SeededBatches:
    """The sampler's batches, each tagged with a seed from (seed, epoch, rank, batch position)."""

    def __init__(self, sampler: AtomBudgetBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        for k, batch in enumerate(s, s._resume_at):
            tagged = _SeededIndices(batch)
            tagged.seed = _seed(s.seed, 4, s.epoch, s.rank, k)
            yield tagged


class _SeededFetch(Dataset):
    """Wraps the dataset: builds a batch's structures after seeding torch/numpy/random with the batch's seed.

    Randomness in ``__getitem__`` (augmentation) is then a function of (seed, epoch, rank, batch position) only:
    the same with any number of workers, persistent or not, and after a resume. In the main process
    (num_workers=0) the global RNG states are saved and restored around it, so training randomness is untouched.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        if getattr(indices, "seed", None) is None:
            return self._fetch(indices)
        if torch.utils.data.get_worker_info() is not None:
            _seed_all(indices.seed)
            return self._fetch(indices)
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                _seed_all(indices.seed)
                return self._fetch(indices)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)

    def _fetch(self, indices):
        if callable(getattr(self.dataset, "__getitems__", None)):
            return self.dataset.__getitems__(list(indices))
        return [self.dataset[i] for i in indices]


class Loader(DataLoader):
    """A DataLoader over an ``AtomBudgetBatchSampler`` that knows how many batches the training loop consumed.

    ``state_dict()`` is the sampler's state with the position of the last batch *yielded by this loader* (workers
    prefetch ahead of that), so resuming from it continues with exactly the next batch the loop did not see.
    Each batch is built under a seed from (seed, epoch, rank, batch position) (see ``_SeededFetch``), so
    random augmentations are reproducible, also across resumes. ``source`` is the wrapped dataset and
    ``atom_sampler`` the sampler (``dataset``/``batch_sampler`` are the seeding wrappers).
    """

    def __init__(self, dataset, sampler: AtomBudgetBatchSampler, **kwargs):
        self._generator = torch.Generator()
        self.atom_sampler = sampler
        self.source = dataset
        super().__init__(_SeededFetch(dataset), batch_sampler=_SeededBatches(sampler), generator=self._generator,
                         **kwargs)
        self._iter_epoch: int | None = None
        self._consumed = 0

    @property
    def epoch(self) -> int:
        return self.atom_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.atom_sampler.set_epoch(epoch)

    def __iter__(self):
        s = self.atom_sampler
        self._generator.manual_seed(_seed(s.seed, 3, s.epoch, s.rank))   # worker base seeds
        self._iter_epoch, self._consumed = s.epoch, s._resume_at
        return self._tracked(super().__iter__())

    def _tracked(self, iterator):
        for batch in iterator:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        state = self.atom_sampler.state_dict()
        if self._iter_epoch == state["epoch"]:
            state["position"] = self._consumed
        return state

    def load_state_dict(self, state: dict, allow_resharding: bool = False) -> None:
        self.atom_sampler.load_state_dict(state, allow_resharding=allow_resharding)
        self._iter_epoch = None


def make_loader(dataset, sampler: AtomBudgetBatchSampler, num_workers: int = 0, *, persistent_workers: bool = False,
                pin_memory: bool | None = None, prefetch_factor: int | None = None,
                collate_fn: Callable = collate, worker_init_fn: Callable | None = None,
                multiprocessing_context=None) -> Loader:
    """A ``Loader`` yielding ``Batch`` objects for ``sampler``'s batches of ``dataset``.

    pin_memory defaults to ``torch.cuda.is_available()``. Workers are seeded deterministically; a user
    ``worker_init_fn`` runs after that seeding. The dataset must open files lazily in each worker.
    """
    if not isinstance(sampler, AtomBudgetBatchSampler):
        raise ValueError(f"make_loader needs an AtomBudgetBatchSampler, got {type(sampler).__name__}")
    if len(sampler.natoms) != len(dataset):
        raise ValueError(f"the sampler covers {len(sampler.natoms)} structures but the dataset has {len(dataset)}; "
                         f"build the sampler from this dataset (AtomBudgetBatchSampler.from_dataset)")

    extra = {} if num_workers == 0 else {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                                         "multiprocessing_context": multiprocessing_context}
    return Loader(dataset, sampler, num_workers=num_workers, collate_fn=collate_fn,
                  pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                  worker_init_fn=_WorkerInit(worker_init_fn) if num_workers else None, **extra)
