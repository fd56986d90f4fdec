"""Distillation: the hvp loss term (vs finite differences), its switch-off rule, and one small end-to-end run
(EMT teacher, tiny student) checking the cache reuse, the report fields and the student's card."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from torch_geometric.data import Batch

from foundation import FoundationModel, ModelConfig, keys
from foundation.data import from_atoms
from foundation.distill.config import distill_config_from_dict, load_distill_config
from foundation.distill.teacher import CalculatorTeacher, pack_vectors, random_unit_vectors
from foundation.train.config import LossConfig
from foundation.train.loss import Loss

TINY = {"num_channels": 8, "radial_mlp": [8], "readout_mlp": 4, "num_layers": 2, "max_ell": 1, "max_L": 1,
        "correlation": 2, "r_max": 4.0}


def tiny_model(seed: int = 0) -> FoundationModel:
    torch.manual_seed(seed)
    model = FoundationModel(ModelConfig.preset("small", elements=["Ni", "Cu"], **TINY))
    model.set_statistics(atomic_energies={"Ni": -0.5, "Cu": -0.3}, scale=0.7, avg_num_neighbors=12.0)
    return model


def hvp_batch(k: int = 2, seed: int = 3):
    """Two rattled Cu/Ni cells (4 and 8 atoms) with k packed unit vectors each (labels: zeros)."""
    rng = np.random.default_rng(seed)
    structures = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Ni", "fcc", a=3.52, cubic=True).repeat((2, 1, 1))]
    graphs = []
    for a in structures:
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        g = from_atoms(a, TINY["r_max"], with_labels=False, dtype=torch.float64)
        v = random_unit_vectors(a, k, seed)
        g[keys.HESSIAN_VECTORS] = torch.from_numpy(pack_vectors(v))
        g[keys.HESSIAN_PRODUCTS] = torch.zeros(len(a), 3 * k, dtype=torch.float64)
        g[keys.DATASET] = torch.zeros(1, dtype=torch.long)
        graphs.append(g)
    return Batch.from_data_list(graphs)


def test_hvp_term_matches_finite_differences_of_the_forces_and_trains():
    model = tiny_model()
    batch = hvp_batch()
    hv = Loss.predict_hvp(model, batch, create_graph=False)            # (12, 6) packed, eV/Å²
    v = batch[keys.HESSIAN_VECTORS]
    h = 1e-4
    for j in range(2):
        d = v[:, 3 * j:3 * j + 3]
        plus, minus = batch.clone(), batch.clone()
        plus[keys.POSITIONS] = batch[keys.POSITIONS] + h * d
        minus[keys.POSITIONS] = batch[keys.POSITIONS] - h * d
        fd = -(model(plus)[keys.FORCES] - model(minus)[keys.FORCES]) / (2 * h)
        np.testing.assert_allclose(hv[:, 3 * j:3 * j + 3].numpy(), fd.numpy(), rtol=1e-5, atol=1e-7)
    assert hv.abs().max() > 1e-2   # not trivially zero
    # the loss term: mean squared error per component, masked rows excluded, differentiable in the weights
    loss = Loss(LossConfig(coefficients={"hvp": 1.0}), max_steps=10)
    batch[keys.HESSIAN_PRODUCTS][:4] = float("nan")                   # first structure unlabelled
    pred = {keys.HESSIAN_PRODUCTS: Loss.predict_hvp(model, batch, create_graph=True)}
    sums, counts = loss.sums(pred, batch), loss.counts(batch)
    assert counts.tolist() == [8 * 6]
    torch.testing.assert_close(sums[0], (hv[4:] ** 2).sum(), rtol=1e-10, atol=0)
    Loss.combine(sums, counts, loss.coefficients(0)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_hvp_switch_hook_turns_the_term_off_once_the_validation_force_mae_reaches_the_threshold(capsys):
    from types import SimpleNamespace

    from foundation.distill.run import HvpSwitch
    cfg = LossConfig(coefficients={"energy": 1.0, "forces": 10.0, "hvp": 2.0})
    loss = Loss(cfg, max_steps=100)
    assert loss.properties == ("energy", "forces", "hvp")
    assert loss.coefficients(0).tolist() == [1.0, 10.0, 2.0] and loss.needs_hvp(loss.coefficients(0))
    hook = HvpSwitch(0.05)
    trainer = SimpleNamespace(loss=loss, step=10, rank=0)
    hook(trainer, {"all/forces": {"mae": 0.08}})
    assert loss.switched_off == {}
    trainer.step = 20
    hook(trainer, {"all/forces": {"mae": 0.05}})
    assert loss.switched_off == {"hvp": 20} and "switched off" in capsys.readouterr().out
    assert loss.coefficients(21).tolist() == [1.0, 10.0, 0.0] and not loss.needs_hvp(loss.coefficients(21))
    trainer.step = 30
    hook(trainer, {"all/forces": {"mae": 0.01}})                                  # once, for good
    assert loss.switched_off == {"hvp": 20}
    again = Loss(cfg, max_steps=100)
    again.load_state_dict(json.loads(json.dumps(loss.state_dict())))              # through checkpoint JSON
    assert again.switched_off == {"hvp": 20} and again.coefficients(50)[2] == 0
    never = Loss(LossConfig(coefficients={"forces": 1.0, "hvp": 1.0}), max_steps=10)
    HvpSwitch(None)(SimpleNamespace(loss=never, step=1, rank=0), {"all/forces": {"mae": 0.0}})
    assert never.switched_off == {}
    with pytest.raises(ValueError, match="not used in this run"):
        never.switch_off("stress", 3)
    # with the term off, batches carrying hvp labels need no H v prediction
    batch = hvp_batch()
    pred = tiny_model()(batch)
    assert loss.sums(pred, batch)[2] == 0


def test_recipe_errors_name_the_nearest_key(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'hvp_vectors'"):
        distill_config_from_dict({"teacher": {"calculator": "ase.calculators.emt:EMT"},
                                  "seeds": {"builtin": "silicon"}, "labels": {"hvp_vector": 2}})
    with pytest.raises(ValueError, match="did you mean 'temperatures'"):
        distill_config_from_dict({"teacher": {"calculator": "x:Y"}, "seeds": {"builtin": "silicon"},
                                  "configurations": {"temperature": [300]}})
    with pytest.raises(ValueError, match="set by the distillation run"):
        distill_config_from_dict({"teacher": {"calculator": "x:Y"}, "seeds": {"builtin": "silicon"},
                                  "data": {"train": ["x"]}})
    with pytest.raises(ValueError, match="labels.hvp_vectors > 0"):
        distill_config_from_dict({"teacher": {"calculator": "x:Y"}, "seeds": {"builtin": "silicon"},
                                  "labels": {"hvp_vectors": 0},
                                  "loss": {"coefficients": {"forces": 1, "hvp": 1}}})
    with pytest.raises(ValueError, match="unknown recipe key 'train'"):   # one layout: no train: section
        distill_config_from_dict({"teacher": {"calculator": "x:Y"}, "seeds": {"builtin": "silicon"},
                                  "train": {"max_steps": 3}})
    for name in ("distill_sevenn_si.yaml", "distill_own_model.yaml"):   # shipped recipes load
        from pathlib import Path
        config = load_distill_config(Path(__file__).resolve().parents[2] / "recipes" / name)
        assert config.loss.coefficients["hvp"] > 0 and config.labels.hvp_off_at_force_mae > 0


def labelled_cells(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.6 + 0.03 * rng.standard_normal(), cubic=True).repeat((2, 1, 1) if i % 2 else 1)
        a.numbers[rng.random(len(a)) < 0.25] = 28
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append(a)
    return out


@pytest.mark.slow
def test_distill_end_to_end_with_an_emt_teacher(tmp_path, monkeypatch, capsys):
    from foundation.cli import main as cli
    write(tmp_path / "seeds.extxyz", labelled_cells(3, 0))
    write(tmp_path / "reference.extxyz", labelled_cells(3, 1))
    recipe = {"out_dir": str(tmp_path / "out"), "name": "test/student",
              "teacher": {"calculator": "ase.calculators.emt:EMT", "name": "EMT"},
              "model": {"preset": "student", "overrides": {k: v for k, v in TINY.items() if k != "max_L"}},
              "seeds": {"files": [str(tmp_path / "seeds.extxyz")], "reference": [str(tmp_path / "reference.extxyz")]},
              "configurations": {"temperatures": [300.0], "md_steps": 4, "md_interval": 2, "rattle_copies": 1,
                                 "strain_copies": 1},
              "labels": {"hvp_vectors": 2, "cache_dir": str(tmp_path / "cache"), "hvp_off_at_force_mae": 100.0},
              "ground_truth": {"weight": 0.5},
              "onpolicy": {"rounds": 1, "md_steps": 4, "interval": 2, "seeds": 1, "pick": 2, "steps": 2},
              "max_steps": 4, "valid_every": 2, "progress": False, "engine": {"zero_stage": 0},
              "data": {"max_atoms": 16, "valid_fraction": 0.2},
              "loss": {"coefficients": {"energy": 1, "forces": 10, "stress": 1, "hvp": 1}},
              "report": {"speed_steps": 3, "speed_repeats": 1, "nve_steps": 5}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    calls = []
    real = CalculatorTeacher._label
    monkeypatch.setattr(CalculatorTeacher, "_label", lambda self, a, v, s: calls.append(len(a)) or real(self, a, v, s))
    assert cli(["distill", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "teacher: EMT (ase " in printed and "speed-up" in printed and "student NVE" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["name"] == "EMT" and report["teacher"]["revision"].startswith("ase ")
    assert report["speed"]["student_atom_steps_per_s"] > 0 and report["speed"]["teacher_atom_steps_per_s"] > 0
    assert report["speed"]["speedup"] == pytest.approx(report["speed"]["student_atom_steps_per_s"]
                                                       / report["speed"]["teacher_atom_steps_per_s"])
    assert {"forces_mae", "energy_per_atom_mae", "stress_mae", "hvp_mae"} <= set(report["vs_teacher"])
    ref = report["vs_reference"]
    assert ref["structures"] == 3 and ref["teacher"]["forces_mae"] < 1e-6   # EMT is its own reference here
    assert ref["force_mae_ratio"] > 1 and "force_error_at_most_1.2x_teacher" in report["checks"]
    assert np.isfinite(report["nve"]["energy_drift_ev_per_atom"]) and report["nve"]["steps"] == 5
    assert report["hvp"]["switched_off_at_step"] == 2        # threshold 100 eV/Å: off at the first validation
    assert len(report["training_datasets"]) == 3             # teacher labels, ground truth, on-policy round
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "**EMT**" in card and f"`{report['teacher']['revision']}`" in card and "speedup" in card
    assert "forces_mae_meV_per_A" in card
    student = FoundationModel.from_pretrained(tmp_path / "out" / "model")
    assert student.config.num_channels == TINY["num_channels"]
    # the same out_dir again: refused without a flag; --resume finds every stage finished and reports again
    assert cli(["distill", str(path)]) == 2 and "--resume" in capsys.readouterr().err
    logged = {stage: (tmp_path / "out" / stage / "train.csv").read_text() for stage in ("train", "round1")}
    assert cli(["distill", str(path), "--resume"]) == 0
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["hvp"]["switched_off_at_step"] == 2 and len(again["training_datasets"]) == 3
    assert {s: (tmp_path / "out" / s / "train.csv").read_text() for s in logged} == logged   # no step retrained
    # a second run reuses the cached teacher labels: no teacher call for them (only the report's reference set)
    first = len(calls)
    assert first >= 3
    recipe["onpolicy"]["rounds"] = 0
    recipe["out_dir"] = str(tmp_path / "out2")
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["distill", str(path)]) == 0
    assert "reusing cache" in capsys.readouterr().out
    assert calls[first:] == [3]            # the 3 reference structures only


def test_distill_from_our_own_model_with_builtin_seeds(tmp_path):
    from foundation.distill.run import distill
    teacher_dir = tiny_model(seed=5).save_pretrained(tmp_path / "teacher")
    config = distill_config_from_dict({
        "out_dir": str(tmp_path / "out"), "teacher": {"model": str(teacher_dir), "name": "tiny teacher"},
        "model": {"preset": "student", "overrides": {k: v for k, v in TINY.items() if k != "max_L"}},
        "seeds": {"builtin": "copper", "max_structures": 3},
        "configurations": {"md_steps": 0, "rattle_copies": 2, "strain_copies": 0},
        "labels": {"hvp_vectors": 1, "cache_dir": str(tmp_path / "cache")}, "ground_truth": {"weight": 0.0},
        "max_steps": 2, "progress": False, "engine": {"zero_stage": 0}, "data": {"valid_fraction": 0.3},
        "loss": {"coefficients": {"energy": 1, "forces": 10, "hvp": 1}},
        "report": {"speed_steps": 2, "speed_repeats": 1, "nve_steps": 0}})
    report = distill(config, log=None)
    assert report["teacher"]["kind"] == "foundation" and report["teacher"]["revision"].startswith("local@weights:")
    assert report["vs_reference"] is None and report["nve"] is None and "hvp_mae" in report["vs_teacher"]
    assert report["hvp"]["switched_off_at_step"] is None
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "**tiny teacher**" in card and report["teacher"]["revision"] in card
