"""Inference copies of a model and readout-head selection (shared by the ASE calculator and the integrations)."""
from __future__ import annotations

import copy

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
          torch.float64: torch.float64}


def inference_copy(model: torch.nn.Module, device: str | torch.device, dtype: str | torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` on ``device``, cast to ``dtype`` ('float32' | 'float64' or the torch dtype), in eval mode.

    The model passed in is left as it was (dtype, device, training mode), so several calculators or simulation
    models can share it, each in its own precision.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return copy.deepcopy(model).to(device=torch.device(device), dtype=DTYPES[dtype]).eval()


def select_head(config, head: str | None) -> tuple[str, int]:
    """(name, index) of readout head ``head`` in ``config.heads`` (default: the first; a model without
    ``heads`` has one, 'default')."""
    heads = list(getattr(config, "heads", None) or ["default"])
    head = heads[0] if head is None else head
    if head not in heads:
        raise ValueError(f"head {head!r} is not a head of this model; choose one of {heads}")
    return head, heads.index(head)
