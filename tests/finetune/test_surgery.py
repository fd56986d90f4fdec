"""Model surgery: heads copied/added/re-initialised, elements added, backbone frozen, LoRA adapters merged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from torch_geometric.data import Batch

from foundation import keys
from foundation.data import from_atoms
from foundation.finetune import surgery
from foundation.model import FoundationModel, ModelConfig

R_MAX = 4.0


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(1)
    cfg = ModelConfig.preset("small", elements=["Ni", "Cu"], num_channels=8, max_L=1, r_max=R_MAX,
                             heads=["a", "b"], atomic_energies={"a": [-1.0, -2.0], "b": [-3.0, -4.0]},
                             scale={"a": 0.7, "b": 1.3}, shift={"a": 0.1, "b": -0.2}, avg_num_neighbors=10.0)
    return FoundationModel(cfg)


def crystal(seed=0, numbers=(29, 28)):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))
    atoms.numbers = np.random.default_rng(seed).choice(numbers, len(atoms))
    atoms.rattle(0.05, seed=seed)
    return atoms


def batch(frames, head=0):
    return Batch.from_data_list([from_atoms(a, r_max=R_MAX, dtype=torch.float64, head=head) for a in frames])


def predict(model, frames, head=0):
    return model(batch(frames, head), compute_stress=True)


def assert_same(got, want, atol=1e-12):
    for k in (keys.ENERGY, keys.FORCES, keys.STRESS):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


def test_add_head_copies_source_and_keeps_backbone(base):
    frames = [crystal(0), crystal(1)]
    new = surgery.add_head(base, "c", source="b")
    assert new.config.heads == ["a", "b", "c"]
    assert new.config.atomic_energies["c"] == base.config.atomic_energies["b"]
    assert new.config.scale["c"] == 1.3 and new.config.shift["c"] == -0.2
    for h, src in ((0, 0), (1, 1), (2, 1)):
        assert_same(predict(new, frames, h), predict(base, frames, src))
    axes = surgery.head_axes(base.config)
    old, state = base.state_dict(), new.state_dict()
    for k in old:   # every non-head weight is the same tensor value, bit for bit
        if k not in axes:
            assert torch.equal(old[k], state[k]), k
    assert set(axes) and all(k.startswith("readouts.") for k in axes)


def test_random_head_and_reorder(base):
    frames = [crystal(2)]
    rnd = surgery.add_head(base, "c", source="a", init="random")
    assert not torch.allclose(predict(rnd, frames, 2)[keys.ENERGY], predict(base, frames, 0)[keys.ENERGY])
    assert_same(predict(rnd, frames, 0), predict(base, frames, 0))
    fresh = surgery.reinit_head(base, "b", seed=3)
    assert fresh.config.atomic_energies["b"] == [-3.0, -4.0] and fresh.config.scale["b"] == 1.3
    assert_same(predict(fresh, frames, 0), predict(base, frames, 0))
    assert not torch.allclose(predict(fresh, frames, 1)[keys.ENERGY], predict(base, frames, 1)[keys.ENERGY])
    swapped = surgery.remap_heads(base, ["b", "a"], ["b", "a"])
    assert_same(predict(swapped, frames, 0), predict(base, frames, 1))
    assert_same(predict(swapped, frames, 1), predict(base, frames, 0))
    with pytest.raises(ValueError, match="already exists"):
        surgery.add_head(base, "a")
    with pytest.raises(ValueError, match="unknown head 'zz'"):
        surgery.add_head(base, "c", source="zz")


def test_extend_elements_keeps_old_predictions(base, tmp_path):
    frames = [crystal(3), crystal(4)]
    ext = surgery.extend_elements(base, ["Al", "H"])
    assert ext.config.elements == ["Ni", "Cu", "Al", "H"]
    assert ext.config.atomic_energies["a"] == [-1.0, -2.0, 0.0, 0.0]
    for h in (0, 1):   # old elements: same predictions up to one rounding per rescaled weight
        assert_same(predict(ext, frames, h), predict(base, frames, h), atol=1e-12)
    axes = surgery.element_axes(base.config)
    assert {"embedding.weight"} <= set(axes)
    old, state = base.state_dict(), ext.state_dict()
    for k in old:
        if k not in axes:
            assert torch.equal(old[k], state[k]), k            # bit-identical
        else:
            assert state[k].shape[axes[k]] == 4
    # structures with the new elements run, and the model survives a strict save/load
    al = crystal(5, numbers=(29, 13))
    assert torch.isfinite(predict(ext, [al])[keys.ENERGY]).all()
    ext.save_pretrained(tmp_path / "ext")
    again = FoundationModel.from_pretrained(tmp_path / "ext")
    assert_same(predict(again, frames + [al]), predict(ext, frames + [al]), atol=0)
    with pytest.raises(ValueError, match="already in the model"):
        surgery.extend_elements(base, ["Cu"])


def test_freeze_backbone_with_new_element_rows(base):
    ext = surgery.extend_elements(base, ["Al"])
    trainable = surgery.freeze_backbone(ext, train_elements=["Al"])
    assert all(k.startswith("readouts.") or k in surgery.element_axes(ext.config) for k in trainable)
    out = ext(batch([crystal(6, numbers=(29, 28, 13))]), training=True)
    (out[keys.ENERGY].sum() + out[keys.FORCES].pow(2).sum()).backward()
    for name, p in ext.named_parameters():
        if name in trainable and name in surgery.element_axes(ext.config):
            g = p.grad.movedim(surgery.element_axes(ext.config)[name], 0)
            assert torch.all(g[:2] == 0) and torch.any(g[2] != 0), name
        elif name not in trainable:
            assert p.grad is None and not p.requires_grad


def test_lora_init_equals_base_and_merge_equals_unmerged(base):
    import copy
    frames = [crystal(7), crystal(8)]
    model = copy.deepcopy(base)
    targets = surgery.add_lora(model, rank=2, alpha=4.0)
    assert targets and all(base.get_parameter(t).dim() == 2 for t in targets)
    assert not any(k.startswith(("readouts.", "embedding")) for k in targets)
    for h in (0, 1):
        assert_same(predict(model, frames, h), predict(base, frames, h), atol=1e-14)   # B = 0: the base (BLAS rounding)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("readouts.") for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b" in n:
                p.normal_(0, 0.1)
    live = predict(model, frames, 1)
    assert not torch.allclose(live[keys.ENERGY], predict(base, frames, 1)[keys.ENERGY])
    for _ in range(2):   # merging a copy twice leaves the adapter model intact
        merged = surgery.merged_copy(model)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert_same(predict(merged, frames, 1), live, atol=1e-12)
    assert_same(predict(model, frames, 1), live, atol=0)
    surgery.merge_lora(model)
    assert set(model.state_dict()) == set(base.state_dict()) and not surgery.has_lora(model)
    assert_same(predict(model, frames, 1), live, atol=1e-12)


def test_molecule_and_crystal_heads_copy_for_each_head(base):
    """A copied head gives the same per-atom energies for a non-periodic structure too."""
    mol = molecule("CH4")
    mol.numbers[:] = [29, 28, 28, 29, 29]
    mol.positions *= 1.8
    new = surgery.add_head(base, "c", source="a")
    torch.testing.assert_close(new(batch([mol], 2))[keys.NODE_ENERGY], base(batch([mol], 0))[keys.NODE_ENERGY],
                               rtol=0, atol=1e-12)


def test_long_range_head_counts_as_a_head():
    cfg = ModelConfig.preset("small", elements=["H", "O"], num_channels=8, max_L=1, r_max=R_MAX,
                             long_range={"kind": "coulomb"})
    model = FoundationModel(cfg)
    water = molecule("H2O")
    ref = model(batch([water]))
    trainable = surgery.freeze_backbone(model)
    assert any(k.startswith("long_range.") for k in trainable)
    assert all(k.startswith(("readouts.", "long_range.")) for k in trainable)
    assert not any(k.startswith("long_range.") for k in surgery.lora_targets(model))
    new = surgery.add_head(model, "x")
    got = new(batch([water], head=1))
    for k in (keys.ENERGY, keys.CHARGES):
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12)


def test_added_long_range_head_starts_at_zero_for_neutral_structures(base):
    frames = [crystal(9)]
    frames[0].pbc, frames[0].cell = False, np.zeros((3, 3))
    lr = surgery.add_long_range(base, {"kind": "coulomb"})
    got, want = predict(lr, frames, 1), predict(base, frames, 1)
    for k in (keys.ENERGY, keys.FORCES):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)
    assert torch.all(got[keys.CHARGES] == 0)
    ion = batch(frames, 1)
    ion[keys.TOTAL_CHARGE] = torch.tensor([1.0], dtype=torch.float64)   # uniform Q/N charges: Coulomb energy > 0
    assert float(lr(ion)[keys.ENERGY][0]) > float(base(ion)[keys.ENERGY][0])
