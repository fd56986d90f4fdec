"""Exponential moving average of model weights, used for validation and for the exported model.

shadow <- d * shadow + (1 - d) * param after each optimizer step, with d = min(decay, (1 + n) / (10 + n))
(n = updates so far) so the average is not dominated by the random initial weights early on. The shadow
is float64 for float64 parameters (``engine.precision: fp64``), float32 otherwise. Buffers are copied, not averaged.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _shadow_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class EMA:
    """EMA of the floating-point parameters of ``module`` (names as in ``module.named_parameters()``)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().to(_shadow_dtype(p)).clone() for name, p in module.named_parameters()
                       if p.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the current parameters of ``module`` into the average (call after each optimizer step)."""
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(d).add_(p.detach().to(self.shadow[name].dtype), alpha=1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Context in which ``module`` carries the averaged weights; the training weights are restored after."""
        backup = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in self.shadow:
                    backup[name] = p.detach().clone()
                    p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: parameters {sorted(missing)} differ; "
                             "resume with the same model configuration")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
