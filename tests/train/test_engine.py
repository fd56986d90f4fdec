"""Data parallelism: 2 gloo ranks with ZeRO 1 / ZeRO 2, one micro-batch each, end with the same parameters (to
float tolerance) as 1 rank accumulating the same two micro-batches per step; the logged losses agree too.
Every multi-rank run here starts beside a stale JIT build lock of DeepSpeed's shm op (left by a killed build), which
used to hang every later run: the op is never loaded, so the runs finish and the lock is never touched."""
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


def run_ranks(tmp: Path, name: str, emt_data, ranks: int, stage: int, gas: int, precision: str = "auto") -> Path:
    """Train the pair potential (float64 for precision fp64) on ``ranks`` processes; returns the out_dir."""
    out = tmp / name
    cfg = recipe(tmp, out, emt_data, zero_stage=stage, precision=precision)
    sets = [f"max_steps={STEPS}", f"engine.gradient_accumulation={gas}", "checkpoint_every=100", "valid_every=100"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    cmd = launcher + [str(RUNNER), str(cfg)] + [a for s in sets for a in ("--set", s)]
    cmd += ["--float64"] if precision == "fp64" else []
    lock = stale_build_lock(tmp / f"{name}_ext")
    res = subprocess.run(cmd, env=dict(env(), TORCH_EXTENSIONS_DIR=str(lock.parent.parent)), capture_output=True,
                         text=True, timeout=900)   # a loaded machine
    assert res.returncode == 0, res.stderr[-3000:]
    assert lock.read_text() == "stale", "the shm op's build lock was touched: the op was loaded"
    return out


def stale_build_lock(ext: Path) -> Path:
    """The lock file torch's JIT build of DeepSpeed's shm op takes, left behind as a SIGKILLed build leaves it."""
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("stale")
    return lock


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


# --- precision ------------------------------------------------------------------------------------------------
def test_resolve_precision_auto_and_errors_naming_the_keys():
    """auto = fp64 for a float64 model, fp32 for a float32 one on CPU; fp64 needs a float64 model and ZeRO 0."""
    from foundation.train.engine import resolve_precision
    cpu = torch.device("cpu")
    assert resolve_precision("auto", torch.float64, cpu, 0) == "fp64"
    assert resolve_precision("auto", torch.float32, cpu, 1) == "fp32"
    assert resolve_precision("fp32", torch.float64, cpu, 1) == "fp32"      # a float64 model cast for training
    assert resolve_precision("bf16", torch.float32, cpu, 0) == "bf16"
    assert resolve_precision("fp64", torch.float64, cpu, 0) == "fp64"
    with pytest.raises(ValueError, match=r"engine\.precision: fp64 needs a float64 model.*'dtype'.*float64"):
        resolve_precision("fp64", torch.float32, cpu, 0)
    with pytest.raises(ValueError, match=r"engine\.zero_stage: 0, got 2"):
        resolve_precision("auto", torch.float64, cpu, 2)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_float64_two_ranks_equal_one_rank_with_two_micro_batches(tmp_path, emt_data):
    """fp64 end to end (weights, all-reduce, clipping, Adam state): 2 ranks x 1 micro-batch end with the weights
    of 1 rank x 2 accumulated micro-batches to 1e-10 (the recipe clips at 1.0, so clipping is exercised)."""
    one = run_ranks(tmp_path, "one64", emt_data, ranks=1, stage=0, gas=2, precision="fp64")
    two = run_ranks(tmp_path, "two64", emt_data, ranks=2, stage=0, gas=1, precision="fp64")
    a, b = final_weights(one), final_weights(two)
    assert a.keys() == b.keys() and {w.dtype for w in a.values() if w.is_floating_point()} == {torch.float64}
    start = load_file(str(one / "model" / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a if a[k].is_floating_point()) > 1e-4
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert diff <= 1e-10, f"max weight difference {diff:.3g}"
    assert [r["atoms"] for r in train_rows(one)] == [r["atoms"] for r in train_rows(two)]
    assert any(float(r["grad_norm"]) > 1.0 for r in train_rows(one))   # clipping (grad_clip 1.0) happened


@pytest.mark.slow
def test_float64_training_checkpoints_and_resumes_exactly(tmp_path, emt_data):
    """precision fp64 with a float64 model: weights, Adam moments, EMA shadow and checkpoints are float64, and a
    run stopped after 3 steps and resumed to 6 logs the losses of 6 uninterrupted steps bit for bit."""
    from pair_model import PairPotential
    from test_loop import small_config

    from foundation.train.checkpoint import latest, load_tree
    from foundation.train.loop import Trainer

    def go(out, steps, resume=False):
        cfg = small_config(out, emt_data, max_steps=steps, checkpoint_every=3, valid_every=3,
                           engine={"precision": "fp64", "gradient_accumulation": 2}, schedule={"name": "constant"})
        torch.manual_seed(0)
        trainer = Trainer(cfg, model=PairPotential([28, 29], r_max=4.0).double(), resume=resume)
        trainer.fit()
        return trainer

    go(tmp_path / "a", 6)
    go(tmp_path / "b", 3)
    trainer = go(tmp_path / "b", 6, resume=True)
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert (tmp_path / "a" / "valid.csv").read_text() == (tmp_path / "b" / "valid.csv").read_text()
    assert trainer.engine.precision == "fp64"
    assert {p.dtype for p in trainer.engine.module.parameters()} == {torch.float64}
    assert {t.dtype for t in trainer.ema.shadow.values()} == {torch.float64}
    moments = [v for st in trainer.engine.optimizer.state.values() for v in st.values() if v.is_floating_point()]
    assert moments and {m.dtype for m in moments if m.dim() > 0} == {torch.float64}
    final = latest(tmp_path / "b" / "checkpoints")
    weights = load_file(str(final / "model.safetensors"))
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float64}
    assert {t.dtype for t in load_tree(final / "ema")["shadow"].values()} == {torch.float64}


@pytest.mark.slow
def test_bf16_fp32_fp64_on_the_same_recipe(tmp_path, emt_data, capsys):
    """recipes/pretrain_small.yaml (float64 model config) at each precision: fp64 trains float64 weights, fp32 and
    bf16 float32 ones; the first loss (before any update) agrees with fp64 to 1e-5 in fp32 and only roughly in
    bf16. A float32 model config with fp64 is an error naming both keys."""
    from foundation.cli import main
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "pretrain_small.yaml"
    sets = [f"data.train=[{emt_data['train']}]", "data.heads=null", f"data.valid=[{emt_data['valid']}]",
            "max_steps=3", "valid_every=3", "checkpoint_every=3", "log_every=1", "progress=false",
            "data.max_atoms=40", "engine.zero_stage=0", "refit_e0.enabled=false",
            "model.overrides={num_channels: 8, r_max: 4.0, num_layers: 1, max_ell: 1, correlation: 2}"]
    first, dtypes = {}, {}
    for precision in ("fp64", "fp32", "bf16"):
        out = tmp_path / precision
        extra = [f"out_dir={out}", f"engine.precision={precision}"]
        assert main(["pretrain", str(recipe_path)] + [a for s in sets + extra for a in ("--set", s)]) == 0
        rows = train_rows(out)
        assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
        first[precision] = float(rows[0]["loss"])
        weights = load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))
        dtypes[precision] = {w.dtype for w in weights.values() if w.is_floating_point()}
    capsys.readouterr()
    assert dtypes == {"fp64": {torch.float64}, "fp32": {torch.float32}, "bf16": {torch.float32}}
    assert first["fp32"] == pytest.approx(first["fp64"], rel=1e-5)
    assert abs(first["bf16"] - first["fp64"]) > abs(first["fp32"] - first["fp64"])   # autocast was on
    assert first["bf16"] == pytest.approx(first["fp64"], rel=0.2)
    bad = [f"out_dir={tmp_path / 'bad'}", "engine.precision=fp64",
           "model.overrides={num_channels: 8, r_max: 4.0, num_layers: 1, max_ell: 1, correlation: 2, dtype: float32}"]
    assert main(["pretrain", str(recipe_path)] + [a for s in sets + bad for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert "engine.precision: fp64" in err and "'dtype'" in err
