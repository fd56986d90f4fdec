"""Learning-rate schedules: warmup, cosine end points, plateau reductions, state round trip."""
from __future__ import annotations

import math

import pytest
import torch

from foundation.train.config import ScheduleConfig
from foundation.train.schedule import LRSchedule


def lrs(schedule: LRSchedule, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(schedule.lr())
        schedule.step()
    return out


def test_warmup_then_cosine():
    s = LRSchedule(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), base_lr=1.0, max_steps=104)
    values = lrs(s, 105)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[104] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_plateau_reduces_after_patience_and_floors():
    s = LRSchedule(ScheduleConfig(name="plateau", plateau_patience=1, plateau_factor=0.5, min_lr_ratio=0.2),
                   base_lr=1.0, max_steps=10)
    for loss in [1.0, 0.5, 0.6, 0.6]:      # improvement, then two bad validations > patience 1
        s.report(loss)
    assert s.lr() == pytest.approx(0.5)
    for _ in range(10):
        s.report(0.9)
    assert s.lr() == pytest.approx(0.2)    # floor = min_lr_ratio * lr


def test_state_round_trip_and_apply():
    cfg = ScheduleConfig(name="plateau", warmup_steps=0)
    a = LRSchedule(cfg, 1e-2, 100)
    for loss in [1.0, 2.0, 2.0, 2.0, 2.0]:
        a.report(loss)
        a.step()
    b = LRSchedule(cfg, 1e-2, 100)
    b.load_state_dict(a.state_dict())
    assert b.lr() == a.lr() and b.step_count == 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert b.apply(opt) == opt.param_groups[0]["lr"] == a.lr()
