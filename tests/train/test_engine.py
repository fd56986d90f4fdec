"""Data parallelism: 2 gloo ranks with ZeRO 1 / ZeRO 2, one micro-batch each, end with the same parameters (to
float tolerance) as 1 rank accumulating the same two micro-batches per step; the logged losses agree too."""
from __future__ import annotations

import csv
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_loop import RUNNER, env, recipe, train_rows

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp: Path, name: str, emt_data, ranks: int, stage: int, gas: int) -> Path:
    out = tmp / name
    cfg = recipe(tmp, out, emt_data, zero_stage=stage)
    sets = [f"max_steps={STEPS}", f"engine.gradient_accumulation={gas}", "checkpoint_every=100", "valid_every=100"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    cmd = launcher + [str(RUNNER), str(cfg)] + [a for s in sets for a in ("--set", s)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def valid_rows(out: Path) -> list[dict]:
    with open(out / "valid.csv", newline="") as f:
        return list(csv.DictReader(f))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, emt_data):
    return run_ranks(tmp_path_factory.mktemp("dp"), "one", emt_data, ranks=1, stage=0, gas=2)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_match_one_rank_with_same_global_batch(tmp_path, emt_data, one_rank, stage):
    two = run_ranks(tmp_path, f"two_zero{stage}", emt_data, ranks=2, stage=stage, gas=1)
    a, b = final_weights(one_rank), final_weights(two)
    assert a.keys() == b.keys()
    start = load_file(str(one_rank / "model" / "model.safetensors"))  # EMA export: differs from training weights
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1e-4, "training did not change the weights: the comparison would be vacuous"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} (ZeRO {stage})")
    ra, rb = train_rows(one_rank), train_rows(two)
    assert [r["atoms"] for r in ra] == [r["atoms"] for r in rb]       # same global batches
    for x, y in zip(ra, rb):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=1e-6)
    (va,), (vb,) = valid_rows(one_rank), valid_rows(two)      # validation split over 2 ranks, then reduced
    assert va.keys() == vb.keys() and "valid/all/forces_rmse" in va
    for key in va:
        assert float(vb[key]) == pytest.approx(float(va[key]), rel=1e-5), key


def test_optim_amsgrad_reaches_the_torch_optimizer():
    """optim.amsgrad (mace-torch's default) builds AMSGrad: the step size stays bounded by the largest second
    moment seen, so after a large gradient a small one moves the weight less than plain Adam does."""
    from foundation.train.config import config_from_dict
    from foundation.train.engine import _optimizer

    def moved(amsgrad: bool) -> float:
        w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(w.weight)
        opt = _optimizer(w, config_from_dict({"optim": {"name": "adam", "lr": 0.1, "amsgrad": amsgrad,
                                                        "betas": [0.0, 0.1]}}))
        assert opt.param_groups[0]["amsgrad"] is amsgrad
        for g in (100.0, 1.0):
            opt.zero_grad()
            w.weight.grad = torch.full_like(w.weight, g)
            before = float(w.weight)
            opt.step()
        return abs(float(w.weight) - before)
    plain, ams = moved(False), moved(True)
    assert ams < 0.5 * plain


@pytest.mark.slow
def test_bf16_precision_trains_under_autocast_with_fp32_weights(tmp_path, emt_data):
    """engine.precision=bf16 (the GPU setting), exercised on the CPU: every training forward runs under bf16
    autocast, evaluation too, the loss stays finite and falls, and weights/optimizer state/checkpoints stay fp32."""
    from pair_model import PairPotential
    from test_loop import small_config

    from foundation.train.checkpoint import latest
    from foundation.train.loop import run

    seen = []

    class Recording(PairPotential):
        def forward(self, batch, **kwargs):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(batch, **kwargs)

    torch.manual_seed(0)
    config = small_config(tmp_path / "bf16", emt_data, engine={"precision": "bf16"}, max_steps=12, valid_every=12,
                          checkpoint_every=12)
    metrics = run(config, model=Recording([28, 29], r_max=4.0))
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    rows = train_rows(tmp_path / "bf16")
    losses = [float(r["loss"]) for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0]
    assert torch.isfinite(torch.tensor(metrics["all/forces"]["mae"]))
    weights = load_file(str(latest(tmp_path / "bf16" / "checkpoints") / "model.safetensors"))
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_launcher_runs_the_cli_on_two_ranks(tmp_path, emt_data):
    """`deepspeed --num_gpus 2 --module foundation.cli pretrain ...` as the README shows: the launcher inserts
    --local_rank=N before the subcommand, and both ranks train and finish (CPU accelerator, gloo)."""
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "pretrain_small.yaml"
    out = tmp_path / "ds"
    sets = [f"data.train=[{emt_data['train']}]", "data.heads=null", f"data.valid=[{emt_data['valid']}]",
            f"out_dir={out}", "max_steps=2", "log_every=1", "valid_every=2", "checkpoint_every=2", "progress=false",
            "data.max_atoms=40", "model.overrides={num_channels: 8, r_max: 4.0, num_layers: 1, max_ell: 1, "
            "correlation: 2}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "foundation.cli", "pretrain", str(recipe_path)] + [a for s in sets for a in ("--set", s)]
    res = subprocess.run(cmd, env=dict(env(), DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "--local_rank=1" in res.stdout + res.stderr            # two ranks were started by the launcher
    assert [int(r["step"]) for r in train_rows(out)] == [1, 2]
    assert (out / "model" / "model.safetensors").is_file()
