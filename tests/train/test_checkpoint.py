"""Checkpoint files: pickle-free round trip of nested state, RNG restore, atomic commit (a crash while writing
never corrupts the latest good checkpoint), pruning, clear errors for damaged checkpoints, and checksums with
which a resume skips a truncated checkpoint for the previous intact one."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from foundation.train import checkpoint as ckpt


def optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_tree_round_trip_of_optimizer_and_rng(tmp_path):
    model, opt = optimizer_state()
    state = {"optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "dtype": torch.float32,
             "array": np.arange(4, dtype=np.uint32), 3: (1, "a", None, 2.5)}
    ckpt.save_tree(state, tmp_path / "s")
    back = ckpt.load_tree(tmp_path / "s")
    assert back[3] == (1, "a", None, 2.5) and back["dtype"] is torch.float32
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [0, 1, 2, 3]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == set(opt.state_dict()["state"])   # int keys survive
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    fresh.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][k], v)
    # RNG: restoring makes every generator repeat the same draws
    ckpt.set_rng_state(back["rng"])
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert not any(p.suffix not in (".json", ".safetensors") for p in tmp_path.iterdir())


def test_arbitrary_objects_are_refused():
    class Opaque:
        pass
    with pytest.raises(ValueError, match=r"Opaque at s\.x\.y"):
        ckpt.to_tree({"x": {"y": Opaque()}})


def write(root, step, value, keep=2):
    tmp = ckpt.staging_dir(root, step)
    ckpt.save_tree({"value": torch.tensor([value])}, tmp / "rank_00000")
    return ckpt.commit(root, step, {"note": value}, keep)


def test_crash_while_writing_keeps_latest_good(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    write(root, 10, 1.0)
    # crash 1: dies while writing the tensors of the next checkpoint
    tmp = ckpt.staging_dir(root, 20)
    (tmp / "rank_00000.safetensors").write_bytes(b"\x00" * 7)   # truncated file, process gone
    assert ckpt.latest(root).name == "step_00000010"
    # crash 2: dies during commit, before the directory rename
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(src).endswith(".tmp") and "step_" in str(src):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write(root, 20, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    good = ckpt.latest(root)
    assert good.name == "step_00000010"
    assert ckpt.load_tree(good / "rank_00000")["value"].item() == 1.0
    assert ckpt.read_meta(good)["note"] == 1.0
    # the next save cleans the stale staging directory and moves 'latest'
    write(root, 30, 3.0)
    assert ckpt.latest(root).name == "step_00000030"
    assert not list(root.glob("*.tmp"))


def test_pruning_and_damaged_checkpoint_errors(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        write(root, step, float(step), keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert ckpt.latest(tmp_path / "nothing") is None
    (root / "step_00000004" / "rank_00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rank_00000.safetensors"):
        ckpt.latest(root)
    meta = json.loads((root / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and "rank_00000.json" in meta["files"]


def test_fresh_run_over_an_older_runs_checkpoints_keeps_its_own(tmp_path):
    """A fresh run in an out_dir with later-step checkpoints of an earlier run (e.g. the demo's 800-step run, then
    the 2000-step recipe) must keep what it writes: 'latest' used to name a just-deleted directory."""
    root = tmp_path / "checkpoints"
    for step in (600, 800):
        write(root, step, float(step), keep=2)
    write(root, 200, 2.0, keep=2)
    assert ckpt.latest(root).name == "step_00000200"
    assert ckpt.read_meta(ckpt.latest(root))["note"] == 2.0
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000200"]
    write(root, 400, 4.0, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000200", "step_00000400"]


def test_checksums_find_a_truncated_file_and_resume_falls_back(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        write(root, step, float(step), keep=2)
    meta = ckpt.read_meta(root / "step_00000002")
    assert set(meta["sha256"]) == {"rank_00000.json", "rank_00000.safetensors"}
    assert ckpt.resumable(root) == root / "step_00000002" and ckpt.damage(root / "step_00000002") is None
    target = root / "step_00000002" / "rank_00000.safetensors"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert "checksum mismatch in ['rank_00000.safetensors']" in ckpt.damage(root / "step_00000002")
    messages = []
    assert ckpt.resumable(root, log=messages.append) == root / "step_00000001"
    assert "step_00000002 is damaged" in messages[0] and "step_00000001" in messages[0]
    (root / "step_00000001" / "rank_00000.json").write_text("{}")
    with pytest.raises(ValueError, match="no intact checkpoint .* --overwrite"):
        ckpt.resumable(root)
    assert ckpt.resumable(tmp_path / "none") is None


def test_resume_after_truncation_replays_the_lost_steps_exactly(tmp_path, emt_data, capsys):
    import csv

    from test_outdir import config, pair_model

    from foundation.train.loop import run
    out = tmp_path / "run"
    run(config(out, emt_data, 4), model=pair_model())
    with open(out / "train.csv", newline="") as f:
        original = list(csv.DictReader(f))
    weights = out / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    run(config(out, emt_data, 4), model=pair_model(), resume=True)
    said = capsys.readouterr().out
    assert "step_00000004 is damaged" in said and "resuming from the previous intact checkpoint step_00000002" in said
    with open(out / "train.csv", newline="") as f:
        resumed = list(csv.DictReader(f))
    for a, b in zip(original, resumed, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    assert ckpt.damage(out / "checkpoints" / "step_00000004") is None
