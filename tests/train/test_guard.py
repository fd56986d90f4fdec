"""The divergence guard: an infinite learning rate, a NaN loss term or a NaN gradient stops the run at that step
with an error naming it; the checkpoints before it stay intact and finite; nothing non-finite is exported."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pair_model import PairPotential
from safetensors.torch import load_file
from test_outdir import config, logged_steps, pair_model

from foundation import keys
from foundation.train import checkpoint as ckpt
from foundation.train.loop import run

# foundation.train.guard.TrainingDiverged is a ValueError (the tests name the base class to run on old code too)


def finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_infinite_learning_rate_stops_at_step_one_without_checkpoint_or_export(tmp_path, emt_data):
    c = config(tmp_path / "inf", emt_data, 4)
    c.optim.lr, c.checkpoint_every = math.inf, 1
    with pytest.raises(ValueError, match=r"at step 1: the optimizer update made parameter .* non-finite"):
        run(c, model=pair_model())
    assert not (c_out := Path(c.out_dir) / "checkpoints").exists() or not any(c_out.glob("step_*"))
    assert not (Path(c.out_dir) / "model").exists()


def test_divergence_after_a_resume_keeps_the_last_finite_checkpoint_and_export(tmp_path, emt_data):
    out = tmp_path / "resume"
    run(config(out, emt_data, 2), model=pair_model())
    exported = (out / "model" / "model.safetensors").read_bytes()
    c = config(out, emt_data, 4)
    c.optim.lr = math.inf
    with pytest.raises(ValueError, match="at step 3"):
        run(c, model=pair_model(), resume=True)
    last = ckpt.resumable(out / "checkpoints")
    assert last.name == "step_00000002" and finite(last / "model.safetensors")
    assert (out / "model" / "model.safetensors").read_bytes() == exported


class NaNForcesAt(PairPotential):
    """Predicts NaN forces from the ``at``-th training forward on."""

    def __init__(self, at: int):
        super().__init__([28, 29], r_max=4.0)
        self.at, self.calls = at, 0

    def forward(self, batch, **kwargs):
        out = super().forward(batch, **kwargs)
        if kwargs.get("training", True):
            self.calls += 1
            if self.calls >= self.at:
                out[keys.FORCES] = out[keys.FORCES] * float("nan")
        return out


class NaNGradient(PairPotential):
    """Finite energies whose gradient w.r.t. ``trap`` is NaN: d sqrt(t^2)/dt at t = 0 is 0/0."""

    def __init__(self):
        super().__init__([28, 29], r_max=4.0)
        self.trap = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch, **kwargs):
        out = super().forward(batch, **kwargs)
        out[keys.ENERGY] = out[keys.ENERGY] + torch.sqrt(self.trap ** 2).sum()
        return out


def test_nan_loss_term_is_named_with_its_step(tmp_path, emt_data):
    c = config(tmp_path / "nan", emt_data, 4)
    c.checkpoint_every = 1
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"at step 3: loss term\(s\) \['forces'\]"):
        run(c, model=NaNForcesAt(3))
    assert ckpt.resumable(Path(c.out_dir) / "checkpoints").name == "step_00000002"
    assert logged_steps(Path(c.out_dir)) == [1, 2]


def test_nan_gradient_with_finite_loss_is_caught_before_the_update(tmp_path, emt_data):
    c = config(tmp_path / "grad", emt_data, 4)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"at step 1: the gradient .* non-finite in parameter 'trap'"):
        run(c, model=NaNGradient())
