"""The divergence guard: a run stops at the first non-finite loss, gradient or weight, before it is used.

Checked in the loop's order of work, so that nothing non-finite is ever applied, checkpointed or exported:

1. each micro-batch's loss terms, before ``backward`` (a NaN/inf term names the property);
2. the all-reduced gradients at the accumulation boundary, before the optimizer step (ZeRO stage 0, where the
   full gradients are on every rank; under ZeRO 1/2 the weight check catches the result one line later);
3. the weights right after the optimizer step (an infinite learning rate turns finite gradients into
   non-finite weights).

The error (``TrainingDiverged``, a ``ValueError``: the CLI prints it as one line) names the optimizer step
(1-based, as in ``train.csv``) and what diverged. The run then stops: the checkpoints already written are the
last finite ones and the model is not exported.
"""
from __future__ import annotations

import math

import torch


class TrainingDiverged(ValueError):
    """The loss, a gradient or the weights became NaN or infinite."""


def _hint(lr: float) -> str:
    return (f"optim.lr is {lr:g}: lower it (or optim.grad_clip), or check the labels; the "
            "checkpoints written before this step are intact and nothing non-finite was saved or exported")


def _any_rank(flag: bool, reduce) -> bool:
    """True on every rank when ``flag`` is True on any (``reduce``: the engine's sum over ranks)."""
    return bool(reduce(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)


def check_loss(sums: torch.Tensor, properties, step: int, lr: float, reduce) -> None:
    """``sums`` (P,): one micro-batch's loss terms in the order of ``properties``; raise if any is non-finite on
    any rank. ``step``: the optimizer step being taken (1-based)."""
    values = sums.detach().cpu().tolist()
    bad = [p for p, v in zip(properties, values) if not math.isfinite(v)]
    if _any_rank(bool(bad), reduce):
        what = f"loss term(s) {bad} are {[values[properties.index(p)] for p in bad]}" if bad else \
            "a loss term is non-finite on another rank"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; {_hint(lr)}")


def _first_bad(named) -> str | None:
    """Name of the first non-finite tensor of ``named`` ((name, tensor or None) pairs), or None. One float64 sum
    over all of them first (NaN/inf propagate into it), so the common all-finite case costs a single check."""
    named = [(n, t.detach()) for n, t in named if t is not None]
    if not named or math.isfinite(float(torch.stack([t.sum(dtype=torch.float64) for _, t in named]).sum())):
        return None
    return next((n for n, t in named if not bool(torch.isfinite(t).all())), None)


def check_gradients(module: torch.nn.Module, step: int, lr: float, properties) -> None:
    """Raise if a gradient of ``module`` is non-finite (call after the all-reduce, before the optimizer step)."""
    name = _first_bad((n, p.grad) for n, p in module.named_parameters() if p.grad is not None)
    if name is not None:
        raise TrainingDiverged(f"training diverged at step {step}: the gradient of the loss "
                               f"({', '.join(properties)}; every term finite) is non-finite in parameter {name!r}; "
                               + _hint(lr))


def check_weights(module: torch.nn.Module, step: int, lr: float) -> None:
    """Raise if a weight of ``module`` is non-finite (call after the optimizer step)."""
    name = _first_bad(module.named_parameters())
    if name is not None:
        raise TrainingDiverged(f"training diverged at step {step}: the optimizer update made parameter {name!r} "
                               f"non-finite (loss and gradients were finite); {_hint(lr)}")


def check_export(module: torch.nn.Module, target) -> None:
    """Never export non-finite weights: raise naming the first non-finite parameter."""
    name = _first_bad(module.named_parameters())
    if name is not None:
        raise TrainingDiverged(f"refusing to export {target}: {name!r} holds NaN or inf values")
