"""AtomBudgetBatchSampler and mixing: determinism, disjointness, equal batch counts, budgets, mixing, resume, memory."""
import json
import time
import tracemalloc
import warnings

import numpy as np
import pytest

from foundation.data import sampling
from foundation.data.sampling import AtomBudgetBatchSampler, ConcatArray, mixing_probabilities, quotas


def _natoms(n=600, seed=0, high=60):
    return np.random.default_rng(seed).integers(1, high, size=n).astype(np.int32)


def _epoch(sampler, epoch=None):
    if epoch is not None:
        sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


def _ranks(natoms, replicas, max_atoms=200, **kw):
    return [AtomBudgetBatchSampler(natoms, max_atoms, num_replicas=replicas, rank=r, **kw) for r in range(replicas)]


def test_deterministic_per_seed_and_epoch():
    nat = _natoms()
    a, b = AtomBudgetBatchSampler(nat, 200, seed=3), AtomBudgetBatchSampler(nat, 200, seed=3)
    e0 = _epoch(a, 0)
    assert e0 == _epoch(b, 0)
    assert e0 == _epoch(a, 0)                                    # iterating again repeats the epoch
    e1 = _epoch(a, 1)
    assert e1 != e0 and sorted(sum(e1, [])) == sorted(sum(e0, []))
    assert _epoch(b, 1) == e1
    assert _epoch(AtomBudgetBatchSampler(nat, 200, seed=4), 0) != e0


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_disjoint_equal_counts_and_budget(replicas, drop_last):
    nat = _natoms(601, seed=replicas)
    samplers = _ranks(nat, replicas, seed=1, drop_last=drop_last)
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts.pop() == len(samplers[0]) > 0    # same number of batches on every rank
        flat = np.concatenate([np.concatenate(b) for b in per_rank])
        assert len(np.unique(flat)) == len(flat)                             # disjoint, no duplicates
        if not drop_last:
            assert np.array_equal(np.sort(flat), np.arange(len(nat)))        # every structure exactly once
        for batches in per_rank:
            assert all(0 < nat[b].sum() <= 200 for b in batches)


@pytest.mark.parametrize("replicas", [2, 3, 7])
def test_global_order_is_independent_of_rank_count(replicas):
    nat = _natoms(500, seed=9)
    single = np.concatenate(_epoch(AtomBudgetBatchSampler(nat, 150, seed=5), 2))
    per_rank = [_epoch(s, 2) for s in _ranks(nat, replicas, max_atoms=150, seed=5)]
    interleaved = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(replicas)]
    assert np.array_equal(np.concatenate(interleaved), single)   # batch b -> rank b % R; splits keep the order


def test_greedy_packing_fills_batches():
    nat = _natoms(2000, seed=2, high=40)
    batches = _epoch(AtomBudgetBatchSampler(nat, 300, seed=0))
    sizes = np.array([nat[b].sum() for b in batches])
    # greedy: a batch was closed only because the next structure did not fit
    following = [nat[batches[k + 1][0]] for k in range(len(batches) - 1)]
    assert np.all(sizes[:-1] + np.array(following) > 300)
    assert sizes.sum() / (len(batches) * 300) > 0.9


def test_structure_over_budget_gets_its_own_batch_with_one_warning():
    nat = np.array([5, 500, 7, 8, 900, 3] * 20, np.int32)
    with pytest.warns(UserWarning, match="40 structures exceed the budget") as record:
        sampler = AtomBudgetBatchSampler(nat, 100, seed=0)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no warning per epoch
        batches = _epoch(sampler, 0) + _epoch(sampler, 1)
    for b in batches:
        assert nat[b].sum() <= 100 or len(b) == 1


def test_edge_budget():
    nat = _natoms(400, seed=4)
    nedges = nat.astype(np.int64) * np.random.default_rng(1).integers(5, 40, size=len(nat))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # a few structures alone exceed 2000 edges
        sampler = AtomBudgetBatchSampler(nat, 10_000, max_edges=2_000, nedges=nedges, seed=0)
    batches = _epoch(sampler)
    assert all(nedges[b].sum() <= 2_000 or len(b) == 1 for b in batches)
    assert max(nat[b].sum() for b in batches) < 10_000      # the edge budget was the binding one
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(nat)))
    with pytest.raises(ValueError, match="nedges"):
        AtomBudgetBatchSampler(nat, 100, max_edges=50)


def test_mixing_probabilities():
    sizes = [1000, 100, 10]
    assert np.allclose(mixing_probabilities(sizes), np.array(sizes) / 1110)
    assert np.allclose(mixing_probabilities(sizes, temperature=1.0), np.array(sizes) / 1110)
    p2 = np.sqrt(sizes) / np.sqrt(sizes).sum()
    assert np.allclose(mixing_probabilities(sizes, temperature=2.0), p2)
    assert np.allclose(mixing_probabilities(sizes, temperature=float("inf")), [1 / 3] * 3)
    assert np.allclose(mixing_probabilities(sizes, temperature=1e6), [1 / 3] * 3, atol=1e-4)
    assert np.allclose(mixing_probabilities(sizes, weights=[2, 1, 1]), [0.5, 0.25, 0.25])
    assert np.allclose(mixing_probabilities([5, 0, 5], temperature=3.0), [0.5, 0, 0.5])
    bads = ({"weights": [1, 1]}, {"weights": [1, -1, 1]}, {"temperature": 0}, {"weights": [1, 1, 1], "temperature": 2})
    for bad in bads:
        with pytest.raises(ValueError):
            mixing_probabilities(sizes, **bad)
    with pytest.raises(ValueError, match="dataset 1 is empty"):
        mixing_probabilities([5, 0], weights=[1, 1])
    q = quotas(np.array([1 / 3, 1 / 3, 1 / 3]), 100)
    assert q.sum() == 100 and set(q.tolist()) == {33, 34}


@pytest.mark.parametrize("mixing", [{"weights": [0.5, 0.3, 0.2]}, {"temperature": 3.0}])
def test_mixing_proportions_follow_weights_or_temperature(mixing):
    sizes = [3000, 500, 200]
    nat = _natoms(sum(sizes), seed=7, high=30)
    p = mixing_probabilities(sizes, **mixing)
    if "temperature" in mixing:
        assert np.allclose(p, np.cbrt(sizes) / np.cbrt(sizes).sum())
    sampler = AtomBudgetBatchSampler(nat, 120, dataset_sizes=sizes, probabilities=p, samples_per_epoch=2000, seed=0)
    offsets = np.cumsum([0] + sizes)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        flat = np.concatenate(batches)
        which = np.searchsorted(offsets, flat, "right") - 1
        assert np.array_equal(np.bincount(which, minlength=3), quotas(p, 2000))       # exact quotas per epoch
        assert np.abs(quotas(p, 2000) - 2000 * p).max() < 1
        # well mixed within the epoch: each quarter of it has the target proportions (binomial 5 sigma)
        for part in np.array_split(which, 4):
            frac = np.bincount(part, minlength=3) / len(part)
            assert np.all(np.abs(frac - p) < 5 * np.sqrt(p * (1 - p) / len(part)))
        # per batch: dataset-0 fraction averages to its probability
        per_batch = [np.mean(np.searchsorted(offsets, b, "right") - 1 == 0) for b in batches]
        assert abs(np.mean(per_batch) - p[0]) < 0.05


def test_down_and_up_sampled_datasets_cycle_without_replacement():
    sizes = [100, 30]
    nat = _natoms(130, seed=1, high=10)
    # dataset 0 gets 25 per epoch (covered once every 4 epochs), dataset 1 gets 75 (each structure 2-3 times)
    sampler = AtomBudgetBatchSampler(nat, 50, dataset_sizes=sizes, probabilities=[0.25, 0.75],
                                     samples_per_epoch=100, seed=2)
    seen0 = []
    for epoch in range(4):
        flat = np.concatenate(_epoch(sampler, epoch))
        seen0.append(flat[flat < 100])
        counts1 = np.bincount(flat[flat >= 100] - 100, minlength=30)
        assert counts1.sum() == 75 and counts1.min() >= 2 and counts1.max() <= 3
    assert all(len(s) == 25 for s in seen0)
    assert np.array_equal(np.sort(np.concatenate(seen0)), np.arange(100))


@pytest.mark.parametrize("replicas", [1, 3])
def test_resume_mid_epoch_and_across_epoch_boundary(replicas):
    nat = _natoms(700, seed=5)
    kw = dict(max_atoms=180, seed=11, dataset_sizes=[500, 200], probabilities=[0.6, 0.4])
    ref = [[_epoch(s, e) for e in range(3)] for s in _ranks(nat, replicas, **kw)]
    for stop_epoch, stop_after in [(0, 5), (1, 0), (1, len(ref[0][1])), (2, len(ref[0][2]) - 1)]:
        states = []
        for sampler in _ranks(nat, replicas, **kw):
            sampler.set_epoch(stop_epoch)
            it = iter(sampler)
            for _ in range(stop_after):
                next(it)
            states.append(json.loads(json.dumps(sampler.state_dict())))     # JSON-serialisable
        assert all(s == states[0] for s in states)                          # one state for all ranks
        for r, fresh in enumerate(_ranks(nat, replicas, **kw)):
            fresh.load_state_dict(states[r])
            fresh.set_epoch(stop_epoch)                         # what a training loop does: keeps the position
            assert _epoch(fresh) == ref[r][stop_epoch][stop_after:]
            assert _epoch(fresh) == ref[r][stop_epoch]          # the epoch again: from its start
            for e in range(stop_epoch + 1, 3):
                assert _epoch(fresh, e) == ref[r][e]


def test_state_dict_position_and_mismatch_errors():
    nat = _natoms(300)
    sampler = AtomBudgetBatchSampler(nat, 150, seed=1)
    sampler.set_epoch(2)
    it = iter(sampler)
    next(it), next(it)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 2)
    sampler.set_epoch(3)
    assert sampler.state_dict()["position"] == 0
    for key, value in [("seed", 2), ("num_replicas", 2), ("num_structures", 5), ("max_atoms", 10)]:
        with pytest.raises(ValueError, match=key):
            AtomBudgetBatchSampler(nat, 150, seed=1).load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="position"):
        AtomBudgetBatchSampler(nat, 150, seed=1).load_state_dict({**state, "position": 10_000})
    with pytest.raises(ValueError, match="lacks"):
        AtomBudgetBatchSampler(nat, 150, seed=1).load_state_dict({"epoch": 0})


def test_no_shuffle_keeps_dataset_order():
    nat = _natoms(100)
    batches = _epoch(AtomBudgetBatchSampler(nat, 120, shuffle=False))
    assert np.array_equal(np.concatenate(batches), np.arange(100))


def test_input_validation():
    with pytest.raises(ValueError, match="structure 3 has 0 atoms"):
        AtomBudgetBatchSampler(np.array([1, 2, 3, 0, 4]), 10)
    with pytest.raises(ValueError, match="natoms must hold integers"):
        AtomBudgetBatchSampler(np.array([1.0, 2.5]), 10)
    with pytest.raises(ValueError, match="max_atoms"):
        AtomBudgetBatchSampler(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="sum to len"):
        AtomBudgetBatchSampler(np.array([1, 2, 3]), 10, dataset_sizes=[1, 1])
    with pytest.raises(ValueError, match="ranks"):
        AtomBudgetBatchSampler(np.array([1, 2, 3]), 10, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="rank 2"):
        AtomBudgetBatchSampler(np.array([1, 2, 3]), 10, num_replicas=2, rank=2)


def test_concat_array_is_a_lazy_concatenate():
    parts = [np.arange(1, 6, dtype=np.int32), np.arange(10, 13, dtype=np.int32), np.array([7], np.int32)]
    lazy, full = ConcatArray(parts), np.concatenate(parts)
    idx = np.array([8, 0, 4, 5, 5, 7, 2])
    assert len(lazy) == 9 and np.array_equal(lazy[idx], full[idx]) and np.array_equal(np.asarray(lazy), full)
    assert lazy[5] == 10 and lazy[-1] == 7 and np.array_equal(lazy[2:7], full[2:7])
    assert lazy.parts[0] is parts[0] or np.shares_memory(lazy.parts[0], parts[0])        # no copy
    a = AtomBudgetBatchSampler(lazy, 12, dataset_sizes=[5, 3, 1], seed=0)
    b = AtomBudgetBatchSampler(full, 12, dataset_sizes=[5, 3, 1], seed=0)
    assert _epoch(a) == _epoch(b)


def _measure(n, max_atoms=2048):
    """(batches, seconds to build an epoch, bytes kept per structure, peak bytes per structure while building)."""
    nat = np.clip(np.random.default_rng(0).lognormal(np.log(20), 0.7, size=n), 1, 300).astype(np.int32)
    sampler = AtomBudgetBatchSampler(nat, max_atoms, seed=0)
    t0 = time.perf_counter()
    nb = len(sampler)                                    # builds epoch 0
    seconds = time.perf_counter() - t0
    sampler.set_epoch(1)
    tracemalloc.start()                                  # (tracing slows Python-level allocation: not timed)
    assert len(sampler) > 0                              # builds epoch 1, replacing epoch 0's index
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return nb, seconds, kept / n, peak / n


def test_index_memory_per_structure(monkeypatch):
    monkeypatch.setattr(sampling, "CHUNK", 1 << 13)      # chunk temporaries small next to the index
    nb, _, kept, peak = _measure(300_000)
    assert nb > 0 and kept < 8.5 and peak < 18


@pytest.mark.slow
def test_ten_million_structures_build_time_and_memory():
    nb, seconds, kept, peak = _measure(10_000_000)
    print(f"\n10M structures: {nb} batches, epoch built in {seconds:.2f} s, "
          f"{kept:.2f} B/structure kept, {peak:.2f} B/structure peak")
    assert kept < 8.5 and peak < 18 and seconds < 60


_DIST_WORKER = """
import json, sys
import numpy as np
import torch.distributed as dist
from foundation.data.sampling import AtomBudgetBatchSampler
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=int(sys.argv[3]))
nat = np.random.default_rng(0).integers(1, 60, size=401).astype(np.int32)
sampler = AtomBudgetBatchSampler(nat, 200, seed=7)          # num_replicas and rank from torch.distributed
sampler.set_epoch(1)
print(json.dumps({"rank": sampler.rank, "replicas": sampler.num_replicas, "batches": list(sampler)}))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rank_and_world_size_come_from_torch_distributed(tmp_path):
    import subprocess
    import sys
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-c", _DIST_WORKER, init, str(r), "2"], stdout=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [(o["rank"], o["replicas"]) for o in outs] == [(0, 2), (1, 2)]
    assert len(outs[0]["batches"]) == len(outs[1]["batches"])
    flat = np.concatenate([np.concatenate(o["batches"]) for o in outs])
    assert np.array_equal(np.sort(flat), np.arange(401))
    local = [_epoch(s, 1) for s in _ranks(np.random.default_rng(0).integers(1, 60, size=401).astype(np.int32), 2,
                                          seed=7)]
    assert [o["batches"] for o in outs] == local


def test_equal_counts_when_no_batch_can_be_split():
    nat = np.full(5, 50, np.int32)                           # every structure alone exceeds the budget
    with pytest.warns(UserWarning):
        samplers = _ranks(nat, 2, max_atoms=10, seed=0)
    with pytest.warns(UserWarning, match="dropping 1 trailing"):
        per_rank = [_epoch(s) for s in samplers]
    assert [len(b) for b in per_rank] == [2, 2]
    flat = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(set(flat.tolist())) == 4


@pytest.mark.parametrize("old, new", [(2, 3), (3, 2), (4, 1)])
def test_resharded_resume_continues_the_global_sequence(old, new):
    nat = _natoms(900, seed=6)
    state_saver = _ranks(nat, old, seed=2)[0]
    state_saver.set_epoch(1)
    it = iter(state_saver)
    for _ in range(5):
        next(it)
    state = state_saver.state_dict()
    with pytest.raises(ValueError, match="allow_resharding"):
        _ranks(nat, new, seed=2)[0].load_state_dict(state)
    single = _epoch(AtomBudgetBatchSampler(nat, 200, seed=2), 1)
    resumed = _ranks(nat, new, seed=2)
    for s in resumed:
        with pytest.warns(UserWarning, match="skipping"):
            s.load_state_dict(state, allow_resharding=True)
    rest = [_epoch(s) for s in resumed]
    assert len({len(r) for r in rest}) == 1
    start = -(-5 * old // new) * new                         # first global batch of the resumed run
    assert start - 5 * old < new
    interleaved = [rest[r][k] for k in range(len(rest[0])) for r in range(new)]
    assert np.array_equal(np.concatenate(interleaved), np.concatenate(single[start:]))


def test_evenly_spaced():
    from foundation.data.sampling import evenly_spaced
    assert evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4] and evenly_spaced(4, None).tolist() == [0, 1, 2, 3]
    idx = evenly_spaced(1000, 7)
    assert idx[0] == 0 and idx[-1] == 999 and len(idx) == 7
