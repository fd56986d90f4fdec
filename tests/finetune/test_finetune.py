"""Fine-tuning: step-0 equality per head, zero-shot and E0 tables, strategies, errors, a real short run.

Base model: a tiny random Cu/Ni model (8 channels) with one head 'emt' and non-trivial E0/scale/shift; new data:
EMT-labelled Cu/Ni/Al cells written to an extxyz file (converted on the fly), so Al is a new element.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import R_MAX, emt_frames, recipe
from torch_geometric.data import Batch

from foundation import keys
from foundation.finetune.config import finetune_config_from_dict
from foundation.finetune.run import finetune, refit_e0
from foundation.model import FoundationModel, ModelConfig


def graphs(frames, head: int):
    from foundation.data import from_atoms
    return Batch.from_data_list([from_atoms(a, r_max=R_MAX, dtype=torch.float64, head=head) for a in frames])


def test_step0_equals_base_with_refitted_e0_per_head(setup):
    logs = []
    res = finetune(finetune_config_from_dict(recipe(
        setup, "s0", finetune={"strategy": "replay", "head": "target"},
        replay={"data": [str(setup / "old.xyz")], "samples": 8, "weight": 0.3})), log=logs.append, train=False)
    model = res["model"]
    assert model.config.heads == ["target", "emt"] and res["added_elements"] == ["Al"]
    base = FoundationModel.from_pretrained(setup / "base")
    frames = emt_frames(4, seed=9, elements=(29, 28))
    for h, name in enumerate(model.config.heads):
        ref = FoundationModel.from_pretrained(setup / "base")
        if name == "target":   # the base with the refitted references (Al is absent from these frames)
            ref.set_statistics(atomic_energies={s: res["e0_new"][s] for s in ref.config.elements})
        got, want = model(graphs(frames, h)), ref(graphs(frames, 0))
        torch.testing.assert_close(got[keys.ENERGY], want[keys.ENERGY], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[keys.FORCES], want[keys.FORCES], rtol=0, atol=1e-10)
    # the pretraining head keeps the base statistics
    assert model.config.atomic_energies["emt"][:2] == base.config.atomic_energies["emt"]
    assert res["step0_difference"] < 1e-10
    from foundation.data import ShardedDataset  # the replay sample: 8 of the 16 old structures, exact labels
    (sample,) = (setup / "s0" / "data").glob("*-replay8-s0")
    (converted,) = [d for d in (setup / "s0" / "data").glob("old-*") if "replay" not in d.name]
    old = {round(float(ShardedDataset(converted).record(i)[keys.ENERGY]), 12) for i in range(16)}
    got = [float(ShardedDataset(sample).record(i)[keys.ENERGY]) for i in range(len(ShardedDataset(sample)))]
    assert len(got) == 8 and {round(e, 12) for e in got} <= old


def test_zero_shot_table_and_least_squares_e0(setup):
    logs = []
    res = finetune(finetune_config_from_dict(recipe(setup, "zs")), log=logs.append, train=False)
    text = "\n".join(logs)
    assert "zero-shot errors" in text and "base E0 MAE" in text and "refit E0 MAE" in text
    for prop in ("energy_per_atom", "forces", "stress"):
        assert f"/emt/{prop}" in text
    zs = res["zero_shot"]
    # the refit can only lower the energy error on the data it was fitted to; on validation data it helps a lot here
    assert zs["refit_e0"]["all/energy_per_atom"]["mae"] < zs["base_e0"]["all/energy_per_atom"]["mae"]
    assert zs["refit_e0"]["all/forces"] == zs["base_e0"]["all/forces"]   # references do not move forces
    # E0 table: old / new / diff per element, new = per-atom least squares on the residuals, the same semantics as
    # the trainer's closing refit_e0 (independent numpy fit: each structure's row and residual divided by N_s)
    from ase.io import read
    frames = read(setup / "new_train.xyz", ":")
    base = FoundationModel.from_pretrained(setup / "base")
    old_e0 = dict(zip(base.config.elements, base.config.atomic_energies["emt"]))
    # the training split of the run: everything (explicit validation file); Al gets E0 0 eV before the fit
    from foundation.finetune import surgery
    ext = surgery.extend_elements(base, ["Al"])
    pred = ext(graphs(frames, 0), compute_forces=False)[keys.ENERGY].numpy()
    counts = np.array([[np.sum(a.numbers == z) for z in (28, 29, 13)] for a in frames], float)
    labels = np.array([a.get_potential_energy() for a in frames])
    natoms = counts.sum(axis=1, keepdims=True)
    delta = np.linalg.lstsq(counts / natoms, (labels - pred) / natoms[:, 0], rcond=None)[0]
    want = {"Ni": old_e0["Ni"] + delta[0], "Cu": old_e0["Cu"] + delta[1], "Al": delta[2]}
    for s, v in want.items():
        assert res["e0_new"][s] == pytest.approx(v, abs=1e-8)
    table = next(m for m in logs if "refitted by least squares" in m)
    ni = next(line for line in table.splitlines() if line.startswith("Ni"))
    assert [float(x) for x in ni.split()[1:]] == pytest.approx([old_e0["Ni"], want["Ni"], want["Ni"] - old_e0["Ni"]],
                                                               abs=2e-6)
    assert next(line for line in table.splitlines() if line.startswith("Al")).split()[1] == "-"


def test_refit_total_and_keep():
    cfg = ModelConfig(elements=["H", "O"], atomic_energies=[-1.0, -2.0])
    numbers = [np.array([1, 1, 8]), np.array([1, 8]), np.array([8, 8])]
    labels = np.array([2 * -13.6 - 2041.0, -13.6 - 2041.0, -4082.0])
    new = refit_e0(cfg, "default", numbers, labels, np.zeros(3), "total")
    assert new["H"] == pytest.approx(-13.6) and new["O"] == pytest.approx(-2041.0)
    assert refit_e0(cfg, "default", numbers, labels, np.zeros(3), "keep") == {"H": -1.0, "O": -2.0}
    assert refit_e0(cfg, "default", numbers, labels, np.zeros(3), {"O": -2035.5}) == {"H": -1.0, "O": -2035.5}
    with pytest.raises(ValueError, match="neither in the base model"):
        refit_e0(cfg, "default", numbers, labels, np.zeros(3), {"C": -1025.0})


def test_unknown_base_head_is_an_error(setup):
    with pytest.raises(ValueError, match="unknown head 'pbe'"):
        finetune(finetune_config_from_dict(recipe(setup, "uh", base={"model": str(setup / "base"), "head": "pbe"})),
                 log=lambda s: None, train=False)


def test_existing_head_name_and_unknown_elements_are_errors(setup):
    with pytest.raises(ValueError, match="already exists"):
        finetune(finetune_config_from_dict(recipe(setup, "eh", finetune={"head": "emt"})), log=lambda s: None,
                 train=False)
    with pytest.raises(ValueError, match="add_elements"):
        finetune(finetune_config_from_dict(recipe(setup, "ne", finetune={"add_elements": False})),
                 log=lambda s: None, train=False)


def test_frozen_backbone_unchanged_after_steps(setup):
    res = finetune(finetune_config_from_dict(recipe(setup, "frozen", max_steps=3, finetune={
        "strategy": "frozen", "monitor": [str(setup / "old.xyz")]})), log=lambda s: None)
    # forgetting table: 'base' is the untouched base model (before the E0 refit of the fine-tuned head)
    from foundation.evaluate import evaluate
    want = evaluate(FoundationModel.from_pretrained(setup / "base"), setup / "old.xyz")
    assert res["forgetting"]["base"]["all/energy"]["mae"] == pytest.approx(want["all/energy"]["mae"], rel=1e-9)
    assert res["forgetting"]["finetuned"]["all/forces"]["mae"] != want["all/forces"]["mae"]
    from foundation.finetune import surgery
    base = FoundationModel.from_pretrained(setup / "base")
    init = surgery.extend_elements(base, ["Al"], seed=0)   # the model before the first step (same seeded init)
    tuned = FoundationModel.from_pretrained(res["model_dir"])
    old, new = init.state_dict(), tuned.state_dict()
    rows = surgery.element_axes(init.config)
    changed = [k for k in old if not torch.equal(old[k].float(), new[k].float())]
    assert {k for k in changed if k.startswith("readouts.")}, "the heads did not train"
    for k in changed:
        if k.startswith("readouts."):
            continue
        assert k in rows, f"backbone weight {k} changed"   # per-element weights: only the new element's rows
        al = init.config.elements.index("Al")
        keep = [i for i in range(old[k].shape[rows[k]]) if i != al]
        assert torch.equal(old[k].float().index_select(rows[k], torch.tensor(keep)),
                           new[k].float().index_select(rows[k], torch.tensor(keep))), k
    assert "embedding.weight" in changed   # the new element's embedding row did train


def test_lora_export_is_merged_and_short_finetune_reduces_error(setup):
    values = recipe(setup, "lora", finetune={"strategy": "lora"}, lora={"rank": 2, "alpha": 4.0}, max_steps=25,
                    valid_every=25)
    values["optim"] = {"lr": 0.02}
    res = finetune(finetune_config_from_dict(values), log=lambda s: None)
    tuned = FoundationModel.from_pretrained(res["model_dir"])   # strict load: names of the base model, no adapters
    before = res["zero_shot"]["refit_e0"]["all/forces"]["rmse"]
    after = res["metrics"]["all/forces"]["rmse"]
    assert after < 0.9 * before, (before, after)
    frames = emt_frames(3, seed=7)
    with torch.no_grad():   # the exported (merged) model predicts what the trained adapter model predicted
        live = res["model"]
        got = tuned(graphs(frames, 0))[keys.ENERGY]
        want = live.double()(graphs(frames, 0))[keys.ENERGY]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_charge_loss_without_charge_head_is_an_error(setup):
    values = recipe(setup, "q")
    values["loss"] = {"coefficients": {"energy": 1.0, "forces": 10.0, "charges": 1.0}}
    with pytest.raises(ValueError, match="no long-range charge head"):
        finetune(finetune_config_from_dict(values), log=lambda s: None, train=False)


def test_cli_finetune_missing_shared_data_is_a_clear_error(setup, capsys, tmp_path):
    from foundation.cli import main
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "finetune_mlearn_si.yaml"
    code = main(["finetune", str(recipe_path), "--set", f"base.model={setup / 'base'}", "--set", "base.head=emt",
                 "--set", f"out_dir={tmp_path}", "--set", f"data.train=[{tmp_path / 'absent.xyz'}]"])
    assert code == 2 and "absent.xyz' not found" in capsys.readouterr().err


_HUB_SCRIPT = """
import json, torch
torch.set_num_threads(1)
from foundation.model import FoundationModel
from foundation.finetune.run import finetune
from foundation.finetune.config import finetune_config_from_dict
base = FoundationModel.from_pretrained({base!r})
sha = base.push_to_hub("org/base")
base.set_statistics(scale=0.9)   # a later revision on main with other weights/statistics
later = base.push_to_hub("org/base")
values = json.loads({recipe!r})
values["base"] = {{"model": "org/base", "revision": sha}}
res = finetune(finetune_config_from_dict(values), log=lambda s: None, train=False)
print("RESULT" + json.dumps(dict(sha=sha, later=later, scale=res["model"].config.scale["emt"],
                                 step0=res["step0_difference"])))
"""


@pytest.mark.slow
def test_base_from_hub_at_a_pinned_revision(setup, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from foundation.hubserver import serve_in_thread
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "test-token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "OMP_NUM_THREADS": "1"}
    script = _HUB_SCRIPT.format(base=str(setup / "base"), recipe=json.dumps(recipe(setup, "hub")))
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["sha"] != res["later"] and res["scale"] == 0.5   # the pinned revision, not main
    assert res["step0"] < 1e-10


def test_random_head_init_only_when_asked(setup):
    logs = []
    res = finetune(finetune_config_from_dict(recipe(setup, "rnd", finetune={"head": "new", "head_init": "random"})),
                   log=logs.append, train=False)
    assert res["model"].config.heads == ["new", "emt"] and res["step0_difference"] > 1e-3
    assert "re-initialised as asked" in "\n".join(logs)
    frames = emt_frames(2, seed=5, elements=(29, 28))   # the kept pretraining head is untouched
    base = FoundationModel.from_pretrained(setup / "base")
    torch.testing.assert_close(res["model"](graphs(frames, 1))[keys.FORCES], base(graphs(frames, 0))[keys.FORCES],
                               rtol=0, atol=1e-12)


def test_added_long_range_head_trains_charges(setup, tmp_path):
    """xTB-like molecules with charges: a charge head added to a base without one, step 0 = base for neutral
    molecules, and the charge loss runs."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write
    rng = np.random.default_rng(0)
    frames = []
    for i in range(12):
        atoms = emt_frames(1, seed=100 + i, elements=(29, 28))[0]
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
        q = rng.normal(0, 0.1, len(atoms))
        q -= q.mean()
        res = dict(atoms.calc.results)
        res.pop("stress")
        atoms.calc = SinglePointCalculator(atoms, **res, charges=q)
        frames.append(atoms)
    write(tmp_path / "q.xyz", frames, format="extxyz")
    values = recipe(setup, "lr", finetune={"long_range": {"kind": "coulomb"}}, max_steps=2)
    values["data"] = {"train": [str(tmp_path / "q.xyz")], "valid": [], "valid_fraction": 0.25, "max_atoms": 32}
    values["loss"] = {"coefficients": {"energy": 1.0, "forces": 10.0, "charges": 1.0}}
    res = finetune(finetune_config_from_dict(values), log=lambda s: None)
    assert res["step0_difference"] < 1e-10
    tuned = FoundationModel.from_pretrained(res["model_dir"])
    assert tuned.config.long_range["kind"] == "coulomb" and "all/charges" in res["metrics"]
    with pytest.raises(ValueError, match="already has a long-range head"):
        from foundation.finetune import surgery
        surgery.add_long_range(tuned, {"kind": "coulomb"})


def test_finetuned_card_names_the_base_the_strategy_and_every_training_set(setup):
    values = recipe(setup, "card", finetune={"strategy": "replay", "head": "target"},
                    replay={"data": [str(setup / "old.xyz")], "samples": 8, "weight": 0.3})
    res = finetune(finetune_config_from_dict(values), log=lambda s: None)
    card = (res["model_dir"] / "README.md").read_text()
    assert f"from `{setup / 'base'}`" in card and "new head `target`, a copy of `emt`" in card
    assert "strategy `replay`" in card and "(8 structures, weight 0.3)" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and ("| target |" in line or "| emt |" in line)]
    assert len(rows) == 2 and "| target | 24 |" in rows[0] and "| emt | 8 |" in rows[1]   # new data, replay sample


def test_finetune_again_into_its_out_dir_needs_resume_or_overwrite(setup):
    import csv

    def steps(out: Path) -> list[int]:
        with open(out / "train.csv", newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f)]
    finetune(finetune_config_from_dict(recipe(setup, "again", checkpoint_every=2)), log=lambda s: None)
    with pytest.raises(ValueError, match=r"holds checkpoints .* --resume.*--overwrite"):
        finetune(finetune_config_from_dict(recipe(setup, "again", checkpoint_every=2)), log=lambda s: None)
    res = finetune(finetune_config_from_dict(recipe(setup, "again", checkpoint_every=2, max_steps=4)),
                   log=lambda s: None, resume=True)
    assert steps(setup / "again") == [1, 2, 3, 4] and (res["model_dir"] / "model.safetensors").is_file()
    finetune(finetune_config_from_dict(recipe(setup, "again", checkpoint_every=2)), log=lambda s: None,
             overwrite=True)
    assert steps(setup / "again") == [1, 2]
    assert sorted(p.name for p in (setup / "again" / "checkpoints").glob("step_*")) == ["step_00000002"]


@pytest.mark.parametrize("key", ["replay.data", "finetune.monitor"])
def test_replay_or_monitor_data_outside_the_base_domain_is_named(setup, tmp_path, key):
    """Replay and monitor data run on the base head: an element the base does not know (Au here; Al comes with the
    new data) stops the run before training, naming the key and the dataset."""
    from ase.io import write
    write(tmp_path / "gold.xyz", emt_frames(4, seed=9, elements=(29, 79)), format="extxyz")
    sections = ({"finetune": {"strategy": "replay", "head": "target"},
                 "replay": {"data": [str(tmp_path / "gold.xyz")], "samples": 0, "weight": 0.3}}
                if key == "replay.data" else {"finetune": {"monitor": [str(tmp_path / "gold.xyz")]}})
    with pytest.raises(ValueError, match=rf"{key}: dataset .*gold.* contains elements \['Au'\]"):
        finetune(finetune_config_from_dict(recipe(setup, f"outside-{key}", **sections)), log=lambda _: None,
                 train=False)
