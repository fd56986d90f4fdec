"""``foundation export mace`` without mace-torch: for every fixture family the inverse map (``mace_tensors``)
gives back the dump's own mace state_dict, weights and buffers, and ``export_spec`` the hyperparameters the
dumper recorded; what mace cannot express (unmerged LoRA, charge embedding, long-range head) is refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foundation.interop import mace_export
from foundation.interop.mace import build_model, read_dump
from foundation.interop.mace_dump import is_structural, spec_mismatches
from foundation.interop.mace_export import check_exportable, export_spec, mace_class, mace_tensors
from foundation.interop.mace_weights import w3j_signs
from foundation.model.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["mp0", "mp0_float32", "mp0b3", "mpa0", "off23", "trained"]
REL = {"float64": 1e-15, "float32": 1e-6}  # float32: the import's one rounding of the silu-constant rescaling


def _unused(key: str, hyper: dict, numel: int) -> torch.Tensor | None:
    """Mask (True = read by mace) of a tensor with entries mace never reads: linear_2's off-diagonal head blocks
    (``mask_head`` zeroes every other head's hidden block), which the import drops and the export writes as 0."""
    heads = len(hyper["heads"])
    if heads == 1 or not key.endswith("linear_2.weight"):
        return None
    hidden = numel // heads // heads
    return torch.eye(heads, dtype=torch.bool).unsqueeze(1).expand(heads, hidden, heads).reshape(-1)


def exported(family: str):
    """(hyper, the dump's tensors, mace_tensors of the imported model, the imported model)."""
    hyper, tensors = read_dump(FIXTURES / family)
    model = build_model(hyper, tensors)
    act = hyper["interactions"][0]["radial_act_constant"]
    cls = mace_class(model.config, {"model_class": hyper["model_class"]})
    return hyper, tensors, mace_tensors(model, w3j_signs(hyper["w3j_signature"]), act, cls), model


def mismatches(hyper: dict, dumped: dict, back: dict) -> list[str]:
    """Tensors of the dump that the export does not reproduce (bit-equal or within REL elementwise)."""
    bad = [f"{k}: not exported" for k, v in dumped.items() if not is_structural(k, v) and k not in back]
    bad += [f"{k}: not in mace's state_dict" for k in back if k not in dumped]
    rel = REL[hyper["dtype"]]
    for key in sorted(set(back) & set(dumped)):
        ours, theirs = back[key].reshape(-1), dumped[key].reshape(-1)
        if ours.numel() != theirs.numel():
            bad.append(f"{key}: {ours.numel()} values, mace has {theirs.numel()}")
            continue
        if not theirs.is_floating_point():
            if not torch.equal(ours.to(theirs.dtype), theirs):
                bad.append(f"{key}: {ours.tolist()} != {theirs.tolist()}")
            continue
        mask = _unused(key, hyper, theirs.numel())
        theirs = theirs.double() if mask is None else torch.where(mask, theirs.double(), 0.0)
        dev = ((ours - theirs).abs() - rel * theirs.abs()).max()
        if dev > 0:
            bad.append(f"{key}: max |ours - mace| exceeds {rel} relative")
    return bad


@pytest.mark.parametrize("family", FAMILIES)
def test_inverse_map_gives_back_the_dumped_mace_tensors(family):
    hyper, dumped, back, model = exported(family)
    assert mismatches(hyper, dumped, back) == []
    buffers = {"atomic_energies_fn.atomic_energies", "scale_shift.scale", "scale_shift.shift", "r_max",
               "radial_embedding.bessel_fn.bessel_weights", "radial_embedding.cutoff_fn.p"}
    if hyper["pair_repulsion"]:
        buffers |= {"pair_repulsion_fn.covalent_radii", "pair_repulsion_fn.a_exp", "pair_repulsion_fn.p",
                    "radial_embedding.distance_transform.covalent_radii", "radial_embedding.distance_transform.q"}
    assert buffers <= set(back)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_spec_matches_the_dumped_hyperparameters(family):
    hyper, _, _, model = exported(family)
    act = hyper["interactions"][0]["radial_act_constant"]
    spec = export_spec(model.config, act, mace_class(model.config, {"model_class": hyper["model_class"]}))
    assert spec_mismatches(spec, hyper) == []
    wrong = dict(spec, interaction_first="RealAgnosticResidualInteractionBlock"
                 if "Density" in spec["interaction_first"] else "RealAgnosticDensityInteractionBlock")
    assert any(m.startswith("interactions") for m in spec_mismatches(wrong, hyper))


def test_a_wrong_sign_or_head_factor_is_caught(monkeypatch):
    """The comparison fails on an inverse map with the product-basis signs dropped or the per-head readout
    normalisation of a single head (mace's linear_2 has fan-in H x hidden)."""
    hyper, dumped, _, _ = exported("mpa0")
    signs = mace_export._signs_of_columns(3, 3, 1, w3j_signs(hyper["w3j_signature"]))
    assert bool((signs < 0).any())
    monkeypatch.setattr(mace_export, "_signs_of_columns", lambda nu, max_ell, L, s: torch.ones(1, dtype=torch.float64))
    bad = mismatches(hyper, dumped, exported("mpa0")[2])
    assert any("weights_max" in b for b in bad)
    monkeypatch.undo()
    monkeypatch.setattr(mace_export, "readout_factor", lambda act, hid, heads: mace_export.act_ratio(act))
    bad = mismatches(hyper, dumped, exported("mpa0")[2])
    assert [b.split(":")[0] for b in bad] == ["readouts.1.linear_2.weight"]


def test_plain_mace_class_only_with_trivial_scale_shift():
    cfg = ModelConfig(elements=["H"], energy_form="mace")
    assert mace_class(cfg, {"model_class": "MACE"}) == "MACE"
    assert mace_class(cfg, {"model_class": "ScaleShiftMACE"}) == "ScaleShiftMACE"
    assert mace_class(ModelConfig(elements=["H"], energy_form="mace", scale={"default": 2.0}),
                      {"model_class": "MACE"}) == "ScaleShiftMACE"


def test_refuses_unmerged_lora(tmp_path):
    from foundation.finetune.surgery import add_lora, merged_copy
    model = build_model(*read_dump(FIXTURES / "trained"))
    check_exportable(model)
    add_lora(model, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        check_exportable(model)
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        mace_export.export_mace(model, tmp_path / "x.model", "/nonexistent/python")
    model.save_pretrained(tmp_path / "adapted")
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        mace_export.export_mace(tmp_path / "adapted", tmp_path / "x.model", "/nonexistent/python")
    check_exportable(merged_copy(model))
    assert not (tmp_path / "x.model").exists()


@pytest.mark.parametrize("overrides, message", [
    ({}, "faded energy assembly"),
    ({"energy_form": "mace", "max_total_charge": 2}, "charge embedding"),
    ({"energy_form": "mace", "long_range": {"kind": "coulomb"}}, "long-range charge head"),
    ({"energy_form": "mace", "num_layers": 1}, "one layer"),
])
def test_refuses_what_mace_cannot_express(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_exportable(ModelConfig(elements=["H", "O"], **overrides))
