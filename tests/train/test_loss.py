"""The loss: masked (never zero-filled) labels, per-atom energy, Huber, dataset weights, coefficient schedule,
and global normalisation (micro-batch losses over global counts add up to the whole-batch loss and gradient)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from pair_model import PairPotential

from foundation import keys
from foundation.data import from_atoms
from foundation.data.loader import collate
from foundation.train.config import LossConfig, LossStage
from foundation.train.loss import Loss


def structures(dtype=torch.float32):
    """Cu/Ni cells with energy/forces/stress, one without stress and one molecule without energy."""
    rng = np.random.default_rng(0)
    out = []
    for i, drop in enumerate([None, keys.STRESS, None, keys.ENERGY]):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) if i != 3 else molecule("H2O")
        if i == 3:                       # a non-periodic Cu/Ni trimer
            atoms.numbers[:] = 29
            atoms.positions *= 2.4
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
        atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
        g = from_atoms(atoms, r_max=4.0, dataset_index=i % 2, dtype=dtype)
        if drop is not None and drop in g:
            del g[drop]
        out.append(g)
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PairPotential([28, 29], r_max=4.0)


def manual_loss(pred, batch, coeffs, rho=lambda d: d * d):
    """The documented loss written out with explicit masks."""
    total = 0.0
    e_ok = torch.isfinite(batch[keys.ENERGY])
    d = (pred[keys.ENERGY] - batch[keys.ENERGY])[e_ok] / batch[keys.NATOMS][e_ok]
    total += coeffs["energy"] * rho(d).mean()
    f_ok = torch.isfinite(batch[keys.FORCES]).all(1)
    total += coeffs["forces"] * rho(pred[keys.FORCES][f_ok] - batch[keys.FORCES][f_ok]).mean()
    s_ok = torch.isfinite(batch[keys.STRESS].reshape(-1, 9)).all(1)
    total += coeffs["stress"] * rho(pred[keys.STRESS][s_ok] - batch[keys.STRESS][s_ok]).mean()
    return total


def test_missing_labels_are_masked_not_zero_filled(model):
    batch = collate(structures())
    assert torch.isnan(batch[keys.ENERGY]).sum() == 1 and torch.isnan(batch[keys.STRESS]).any()
    coeffs = {"energy": 1.0, "forces": 10.0, "stress": 100.0}
    loss = Loss(LossConfig(coefficients=coeffs), max_steps=10)
    pred = model(batch, compute_stress=True)
    value = Loss.combine(loss.sums(pred, batch), loss.counts(batch), loss.coefficients(0))
    expected = manual_loss({k: v.double() for k, v in pred.items()}, batch.to_dict() | {}, coeffs)
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    filled = batch.clone()
    filled[keys.ENERGY] = torch.nan_to_num(filled[keys.ENERGY])
    filled[keys.STRESS] = torch.nan_to_num(filled[keys.STRESS])
    zero_filled = Loss.combine(loss.sums(pred, filled), loss.counts(filled), loss.coefficients(0))
    assert abs(float(zero_filled) - float(value)) > 1e-3 * float(value)
    value.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert loss.counts(batch).tolist() == [3.0, 3.0 * int(batch[keys.ATOMIC_NUMBERS].numel()), 18.0]


def test_huber_weights_and_schedule(model):
    batch = collate(structures())
    pred = {k: v.detach() for k, v in model(batch, compute_stress=True).items()}
    cfg = LossConfig(kind="huber", huber_delta=0.05, coefficients={"forces": 1.0})
    loss = Loss(cfg, max_steps=10)
    rho = lambda d: torch.nn.functional.huber_loss(d, torch.zeros_like(d), reduction="none", delta=0.05)  # noqa: E731
    f = pred[keys.FORCES].double() - batch[keys.FORCES].double()
    value = Loss.combine(loss.sums(pred, batch), loss.counts(batch), loss.coefficients(0))
    assert float(value) == pytest.approx(float(rho(f).mean()), rel=1e-12)
    weighted = Loss(LossConfig(coefficients={"forces": 1.0}, dataset_weights=[1.0, 3.0]), 10)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)[batch[keys.DATASET][batch.batch]]
    expected = (w[:, None] * f ** 2).sum() / f.numel()
    got = Loss.combine(weighted.sums(pred, batch), weighted.counts(batch), weighted.coefficients(0))
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    staged = Loss(LossConfig(coefficients={"energy": 1.0, "forces": 10.0},
                             schedule=[LossStage(start=0.8, coefficients={"energy": 20.0})]), max_steps=10)
    assert staged.coefficients(7).tolist() == [1.0, 10.0]
    assert staged.coefficients(8).tolist() == [20.0, 10.0]


def test_micro_batches_over_global_counts_equal_the_whole_batch(model):
    data = structures(torch.float64)
    model.double()
    loss = Loss(LossConfig(coefficients={"energy": 1.0, "forces": 10.0, "stress": 5.0}), 10)
    coeffs = loss.coefficients(0)

    def grads_of(parts):
        model.zero_grad()
        counts = sum(loss.counts(collate(p)) for p in parts)
        total = 0.0
        for p in parts:
            b = collate(p)
            value = Loss.combine(loss.sums(model(b, compute_stress=True), b), counts, coeffs)
            value.backward()
            total += float(value)
        return total, [q.grad.clone() for q in model.parameters()]

    whole, g_whole = grads_of([data])
    split, g_split = grads_of([data[:1], data[1:]])   # 1 and 3 structures: very different atom counts
    assert split == pytest.approx(whole, rel=1e-12)
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_all_zero_coefficients_and_missing_prediction_are_errors(model):
    with pytest.raises(ValueError, match="every coefficient is zero"):
        Loss(LossConfig(coefficients={"energy": 0.0}), 10)
    batch = collate(structures())
    loss = Loss(LossConfig(coefficients={"stress": 1.0}), 10)
    pred = model(batch, compute_stress=False)
    with pytest.raises(ValueError, match="did not predict 'stress'"):
        loss.sums(pred, batch)


def test_charge_excess_is_a_label_free_term_over_every_structure(model):
    batch = collate(structures())
    loss = Loss(LossConfig(coefficients={"energy": 1.0, "charge_excess": 2.0}, dataset_weights=[1.0, 3.0]), 10)
    excess = torch.tensor([0.5, -0.2, 0.0, 1.0], requires_grad=True)
    pred = {**model(batch, compute_stress=False), keys.CHARGE_EXCESS: excess}
    sums, counts = loss.sums(pred, batch), loss.counts(batch)
    i = loss.properties.index(keys.CHARGE_EXCESS)
    weights = torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64)   # dataset index i % 2
    assert counts[i] == 4   # no label needed: every structure counts
    torch.testing.assert_close(sums[i], (weights * excess.double() ** 2).sum())
    total = Loss.combine(sums, counts, loss.coefficients(0))
    total.backward()
    torch.testing.assert_close(excess.grad, (2.0 * weights * 2 * excess.detach().double() / 4).float())
    del pred[keys.CHARGE_EXCESS]
    with pytest.raises(ValueError, match="charge_excess.*long-range"):
        loss.sums(pred, batch)
