"""Exact resume: a run killed with SIGKILL at an arbitrary step and resumed logs the same losses, bit for bit
(1 rank, fp32, CPU), as the uninterrupted run; checkpoints stay loadable whatever the moment of the kill."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

RUNNER = Path(__file__).resolve().parent / "run_pair.py"
STEPS = 12                  # x 2 micro-batches of <= 48 atoms: crosses an epoch boundary (14 batches)


def recipe(tmp: Path, out: Path, emt_data, **engine) -> Path:
    values = {"out_dir": str(out), "max_steps": STEPS, "log_every": 1, "valid_every": 5, "checkpoint_every": 2,
              "keep_checkpoints": 2, "progress": False, "seed": 3,
              "data": {"train": [str(emt_data["train"]), str(emt_data["train_nostress"])],
                       "valid": [str(emt_data["valid"])], "max_atoms": 48},  # 14 batches per epoch
              "loss": {"coefficients": {"energy": 1.0, "forces": 10.0, "stress": 10.0},
                       "schedule": [{"start": 0.5, "coefficients": {"energy": 20.0}}]},
              "optim": {"lr": 0.02, "grad_clip": 1.0}, "schedule": {"warmup_steps": 2},
              "engine": {"gradient_accumulation": 2, **engine}, "ema": {"decay": 0.9}}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def env(delay: float = 0.0) -> dict:
    from foundation.train.engine import child_environment
    return child_environment(FOUNDATION_TEST_STEP_DELAY=str(delay), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def train_rows(out: Path) -> list[dict]:
    with open(out / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_logged_step(out: Path) -> int:
    try:
        rows = train_rows(out)
    except (FileNotFoundError, ValueError):
        return 0
    return int(rows[-1]["step"]) if rows else 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_and_resume_logs_identical_losses(tmp_path, emt_data):
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(RUNNER), str(recipe(tmp_path, full, emt_data))], env=env(), check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    cfg = recipe(tmp_path, killed, emt_data)
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(cfg)], env=env(delay=0.15),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while last_logged_step(killed) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_logged_step(killed)
    assert 5 <= killed_at < STEPS, f"the run was not killed mid-way (last logged step {killed_at})"
    subprocess.run([sys.executable, str(RUNNER), str(cfg), "--resume"], env=env(), check=True,
                   capture_output=True, timeout=300)
    a, b = train_rows(full), train_rows(killed)
    assert [int(r["step"]) for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_energy", "loss_forces", "loss_stress", "lr", "grad_norm", "atoms"):
            assert ra[key] == rb[key], f"step {ra['step']}: {key} {ra[key]} != {rb[key]}"
    assert (full / "valid.csv").read_text() == (killed / "valid.csv").read_text()


# --- in-process runs ----------------------------------------------------------------------------------------------
def small_config(out: Path, emt_data, **top):
    from foundation.train.config import config_from_dict
    values = {"out_dir": str(out), "max_steps": 24, "log_every": 1, "valid_every": 8, "checkpoint_every": 8,
              "progress": False, "seed": 5,
              "data": {"train": [str(emt_data["train"]), str(emt_data["train_nostress"])],
                       "valid": [str(emt_data["valid"])], "max_atoms": 48},
              "loss": {"coefficients": {"energy": 1.0, "forces": 10.0, "stress": 10.0}},
              "optim": {"lr": 0.02}, "schedule": {"warmup_steps": 2}, "ema": {"decay": 0.8}, **top}
    return config_from_dict(values)


@pytest.mark.slow
def test_run_learns_and_writes_logs_checkpoints_and_ema_export(tmp_path, emt_data):
    import torch
    from pair_model import PairPotential
    from safetensors.torch import load_file

    from foundation.train.checkpoint import latest, load_tree
    from foundation.train.loop import run
    torch.manual_seed(0)
    metrics = run(small_config(tmp_path / "run", emt_data), model=PairPotential([28, 29], r_max=4.0))
    out = tmp_path / "run"
    valid = list(csv.DictReader(open(out / "valid.csv")))
    assert [int(r["step"]) for r in valid] == [8, 16, 24]
    assert float(valid[-1]["valid/all/forces_mae"]) < 0.7 * float(valid[0]["valid/all/forces_mae"])
    assert metrics["all/forces"]["mae"] == pytest.approx(float(valid[-1]["valid/all/forces_mae"]))
    assert metrics["all/stress"]["count"] == 12 * 9                  # valid set has stress for every structure
    assert len(train_rows(out)) == 24 and (out / "learning_curve.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    final = latest(out / "checkpoints")
    assert final.name == "step_00000024"
    exported = load_file(str(out / "model" / "model.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    shadow = load_tree(final / "ema")["shadow"]
    assert not torch.equal(exported["pair_gain"], trained["pair_gain"])   # export = EMA, not the last weights
    torch.testing.assert_close(exported["pair_gain"], shadow["pair_gain"])
    in_checkpoint = load_file(str(final / "model" / "model.safetensors"))   # each checkpoint carries the export
    assert all(torch.equal(in_checkpoint[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_cli_pretrain_real_model_then_evaluate(tmp_path, emt_data, capsys):
    import torch

    from foundation.cli import main
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "pretrain_small.yaml"
    out = tmp_path / "cli"
    sets = [f"data.train=[{emt_data['train']},{emt_data['train_nostress']}]", "data.heads=[emt,emt2]",
            f"data.valid=[{emt_data['valid']}]", f"out_dir={out}", "max_steps=3", "valid_every=3",
            "checkpoint_every=3", "log_every=1", "progress=false", "data.max_atoms=40", "engine.zero_stage=0",
            "model.overrides={num_channels: 8, r_max: 4.0, num_layers: 1, max_ell: 1, correlation: 2}"]
    assert main(["pretrain", str(recipe_path)] + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "model exported to" in printed and "valid/emt " in printed and "forces" in printed
    from foundation import FoundationModel
    model = FoundationModel.from_pretrained(out / "model")   # the float64 model was trained in float32
    assert model.dtype == torch.float64 and model.config.heads == ["emt", "emt2"]
    import json
    card_data = json.loads((out / "model" / "config.json").read_text())["datasets"]   # the card's provenance
    assert [(d["head"], d["structures"]) for d in card_data] == [("emt", 40), ("emt2", 24)]
    card = (out / "model" / "README.md").read_text()
    assert "| dataset | head | structures | level of theory | license |" in card
    assert all(f"| {d['name']} | {d['head']} | {d['structures']} |" in card for d in card_data)
    assert main(["evaluate", str(out / "model"), str(emt_data["valid"]), "--head", "emt2",
                 "--plot", str(tmp_path / "parity.png"), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "valid/emt2 " in table and "forces" in table and (tmp_path / "parity.png").stat().st_size > 1000
    assert main(["evaluate", str(out / "model"), str(emt_data["valid"]), "--head", "dft"]) == 2
    assert "unknown head 'dft'" in capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["all/forces"]["count"] > 0


def test_cli_pretrain_unknown_key_is_a_clear_error(capsys):
    from foundation.cli import main
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "pretrain_small.yaml"
    assert main(["pretrain", str(recipe_path), "--set", "optim.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "'optim.learning_rate'" in err and "did you mean" in err


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_restores_zero_partitions_exactly(tmp_path, emt_data, stage):
    """ZeRO keeps fp32 master partitions and the optimizer state inside DeepSpeed: a run stopped after 3 steps
    and resumed to 6 logs the same losses as 6 uninterrupted steps (constant LR, so the horizon does not matter)."""
    import torch
    from pair_model import PairPotential

    from foundation.train.loop import run

    def go(out, steps, resume=False):
        cfg = small_config(out, emt_data, max_steps=steps, checkpoint_every=3, valid_every=100,
                           engine={"zero_stage": stage, "gradient_accumulation": 2},
                           schedule={"name": "constant"})
        torch.manual_seed(0)
        run(cfg, model=PairPotential([28, 29], r_max=4.0), resume=resume)

    go(tmp_path / "a", 6)
    go(tmp_path / "b", 3)
    go(tmp_path / "b", 6, resume=True)
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.slow
def test_loader_workers_do_not_change_the_losses(tmp_path, emt_data):
    """Structures built in 2 DataLoader worker processes give bit-identical losses to the main process."""
    import torch
    from pair_model import PairPotential

    from foundation.train.loop import run
    losses = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        cfg = small_config(out, emt_data, max_steps=5, valid_every=100, checkpoint_every=100,
                           data={"train": [str(emt_data["train"]), str(emt_data["train_nostress"])],
                                 "valid": [str(emt_data["valid"])], "max_atoms": 48, "num_workers": workers})
        torch.manual_seed(0)
        run(cfg, model=PairPotential([28, 29], r_max=4.0))
        losses.append([r["loss"] for r in train_rows(out)])
    assert losses[0] == losses[1] and len(losses[0]) == 5


@pytest.mark.slow
def test_heads_share_one_atom_weighted_neighbour_count(tmp_path, emt_data):
    """Per-head E0/scale/shift, but one mean neighbour count over all training data (it normalises the shared
    backbone): with a dense and a sparse head it is their atom-weighted mean, not the last head's value."""
    from ase import Atoms
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from foundation.data.convert import convert
    from foundation.train import data as tdata
    from foundation.train.loop import Trainer
    frames = []
    for k in range(12):   # isolated Cu dimers: about one neighbour per atom
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3 + 0.05 * k]])
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(atoms)
    write(tmp_path / "dimers.xyz", frames)
    dimers = convert([tmp_path / "dimers.xyz"], tmp_path / "dimers", r_max=4.0, progress=False)
    config = small_config(tmp_path / "heads", emt_data, max_steps=1, valid_every=1, checkpoint_every=1)
    config.data.train, config.data.heads, config.data.valid = [str(emt_data["train"]), str(dimers)], ["bulk", "gas"], []
    config.model.overrides = {"num_channels": 8, "r_max": 4.0, "num_layers": 1, "max_ell": 1, "correlation": 2}
    trainer = Trainer(config.validate())
    model = trainer.engine.module
    dense = tdata.statistics([trainer.train_sets[0]], 4.0)["avg_num_neighbors"]
    sparse = tdata.statistics([trainer.train_sets[1]], 4.0)["avg_num_neighbors"]
    atoms = [int(d.natoms.sum()) for d in trainer.train_sets]
    assert sparse < 2 < 10 < dense
    expected = (dense * atoms[0] + sparse * atoms[1]) / sum(atoms)
    assert model.config.avg_num_neighbors == pytest.approx(expected, rel=1e-12)
    assert model.config.scale["bulk"] != model.config.scale["gas"]        # the per-head statistics stay per head
