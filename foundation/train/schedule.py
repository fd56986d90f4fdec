"""Learning-rate schedules: linear warmup, then cosine decay, reduce-on-plateau, or constant.

The schedule owns nothing but a few numbers (JSON state), sets ``lr`` on the optimizer's param groups itself
(the same call works for a torch optimizer and DeepSpeed's ZeRO wrapper), and is stepped once per optimizer
step. ``lr_at`` is a pure function of the state, so a resumed run gets the same learning rates.
"""
from __future__ import annotations

import math

from .config import ScheduleConfig


class LRSchedule:
    """Learning rate for optimizer step ``self.step_count`` (0-based), base rate ``base_lr``."""

    def __init__(self, config: ScheduleConfig, base_lr: float, max_steps: int):
        self.config = config
        self.base_lr = float(base_lr)
        self.max_steps = int(max_steps)
        self.step_count = 0
        self.plateau_scale = 1.0   # product of plateau reductions so far
        self.best = math.inf       # best validation loss seen (plateau)
        self.bad_validations = 0

    def lr(self) -> float:
        """Learning rate to use for the next optimizer step."""
        c, step = self.config, self.step_count
        floor = self.base_lr * c.min_lr_ratio
        if c.warmup_steps > 0 and step < c.warmup_steps:
            return self.base_lr * (step + 1) / c.warmup_steps
        if c.name == "cosine":
            progress = min(1.0, (step - c.warmup_steps) / max(1, self.max_steps - c.warmup_steps))
            return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if c.name == "plateau":
            return max(floor, self.base_lr * self.plateau_scale)
        return self.base_lr

    def apply(self, optimizer) -> float:
        """Set the current learning rate on every param group of ``optimizer``; returns it."""
        lr = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_count += 1

    def report(self, validation_loss: float) -> None:
        """Tell a plateau schedule the latest validation loss (ignored by the other schedules)."""
        if self.config.name != "plateau" or not math.isfinite(validation_loss):
            return
        if validation_loss < self.best * (1.0 - self.config.plateau_threshold):
            self.best, self.bad_validations = validation_loss, 0
            return
        self.bad_validations += 1
        if self.bad_validations > self.config.plateau_patience:
            self.plateau_scale *= self.config.plateau_factor
            self.bad_validations = 0

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "best": self.best if math.isfinite(self.best) else None, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.bad_validations = int(state["bad_validations"])
