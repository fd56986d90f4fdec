"""The deployable artifact: ``foundation export torchscript MODEL --out model.pt [--head NAME] [--dtype ...]``.

``export_torchscript`` writes one TorchScript file (``torch.jit.save``) of one head of a model in one dtype. It loads
with ``torch.jit.load`` in any process that has PyTorch, without ``foundation`` or e3nn installed, and is called as
``artifact(inputs: Dict[str, Tensor]) -> Dict[str, Tensor]`` (names of ``foundation.keys``; see
``foundation.integrations.deployed``). The neighbour list is computed outside, as LAMMPS and torch-sim do: all pairs
closer than ``artifact.r_max`` (both directions, ASE's ``neighbor_list("ijS")`` with i = sender, j = receiver).
Attributes of the loaded module: ``r_max`` (Å), ``atomic_numbers`` (the model's elements), ``num_layers``,
``dtype_name``, ``compute_stress`` (True; set False to skip stress and virials). The file also carries
``foundation.json`` (head, elements, r_max, dtype, foundation version, the model config) as an extra file.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..model.inference import inference_copy, select_head
from .deployed import DeployedModel

METADATA = "foundation.json"
# components of imported mace-torch models (foundation.interop) that the scripted model does not implement
_NOT_SCRIPTED = {"energy_form": "faded", "first_interaction": "residual", "interaction_norm": "average",
                 "distance_transform": None, "pair_repulsion": None}


def check_scriptable(config) -> None:
    """A clear error for a model using a component the TorchScript model lacks (those of imported mace-torch
    models: mace energy form, plain first block, density normalisation, Agnesi transform, ZBL)."""
    used = {k: getattr(config, k) for k, default in _NOT_SCRIPTED.items() if getattr(config, k) != default}
    if used:
        raise ValueError(f"foundation export torchscript does not support {sorted(used)} (set in this model's "
                         f"config: {used}); export an imported mace-torch model with 'foundation export mace' and "
                         "use mace-torch's own LAMMPS/TorchScript route instead")


def build_artifact(model, head: str | None = None, dtype: str | None = None) -> torch.jit.ScriptModule:
    """The scripted artifact of ``model`` (a ``FoundationModel``) for readout head ``head`` (default: the first) in
    ``dtype`` ('float32' | 'float64', default: the model's). The model passed in is not changed."""
    config = model.config
    check_scriptable(config)
    _, head_index = select_head(config, head)
    dtype = config.dtype if dtype is None else dtype
    copy = inference_copy(model, "cpu", dtype)
    with warnings.catch_warnings():  # torch >= 2.10 marks torch.jit.script deprecated; it is what LAMMPS loads
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        return torch.jit.script(DeployedModel(copy, head_index))


def metadata(model, head: str | None, dtype: str | None) -> dict:
    """What the artifact was made from: head, elements, r_max (Å), dtype, versions and the model config."""
    config = model.config
    name, _ = select_head(config, head)
    from dataclasses import asdict
    return {"format": "foundation-torchscript-1", "head": name, "elements": list(config.elements),
            "atomic_numbers": list(config.atomic_numbers), "r_max": float(config.r_max),
            "dtype": dtype or config.dtype, "foundation_version": __version__, "torch_version": torch.__version__,
            "long_range": config.long_range is not None, "max_total_charge": int(config.max_total_charge),
            "config": asdict(config)}


def export_torchscript(model, out: str | Path, head: str | None = None, dtype: str | None = None) -> Path:
    """Script ``model`` (a ``FoundationModel``, or a Hub id / saved directory) and write it to ``out`` atomically.

    Returns the path written. ValueError for an unknown head or dtype (nothing is written then).
    """
    if isinstance(model, (str, Path)):
        from ..model.backbone import FoundationModel
        model = FoundationModel.from_pretrained(model)
    if dtype is not None and dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    scripted = build_artifact(model, head, dtype)
    extra = {METADATA: json.dumps(metadata(model, head, dtype), indent=1)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.jit.save(scripted, tmp, _extra_files=extra)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def read_metadata(path: str | Path) -> dict:
    """The ``foundation.json`` of an artifact file (ValueError if the file is not a foundation artifact)."""
    extra = {METADATA: ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript file ({err})") from err
    if not extra[METADATA]:
        raise ValueError(f"{path} has no {METADATA}: not written by `foundation export torchscript`")
    return json.loads(extra[METADATA])


def main(model: str, out: str, head: str | None = None, dtype: str | None = None) -> str:
    """``foundation export torchscript``: export, reload the file and return a one-paragraph summary."""
    start = time.perf_counter()
    path = export_torchscript(model, out, head, dtype)
    meta = read_metadata(path)
    size = path.stat().st_size / 1e6
    return (f"wrote {path} ({size:.1f} MB, {time.perf_counter() - start:.1f} s): head {meta['head']!r}, "
            f"{meta['dtype']}, r_max {meta['r_max']} Å, elements {' '.join(meta['elements'])}. Load it with "
            f"torch.jit.load({str(path)!r}); call it on a dict with pos, atomic_numbers, edge_index, shifts, cell, "
            f"pbc (see `foundation.integrations.artifact`).")
