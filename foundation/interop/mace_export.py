"""``foundation export mace``: a saved ``FoundationModel`` -> a mace-torch ``.model`` file (ScaleShiftMACE).

The backbone's tensors are mapped back to mace's layouts here (the inverse of ``mace_weights``), written as
safetensors + export.json; the last step, building the mace model and saving the pickle, runs in the mace
environment (``mace_dump.py --build`` under ``--mace-python``). Only what mace can express is exported: the
"mace" energy form (imported models and their fine-tunes), no charge embedding, no long-range head.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..nn.cg import conv_paths, coupling_trees, symmetric_basis, symmetrize
from ..nn.radial import SILU_NORM
from .mace import DUMPER
from .mace_weights import w3j_signs


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, naming it, what mace-torch cannot express."""
    if cfg.energy_form != "mace":
        raise ValueError("this model uses foundation's faded energy assembly (isolated atoms get exactly E0), which "
                         "mace-torch cannot express; only imported mace models and their fine-tunes export")
    if cfg.max_total_charge:
        raise ValueError("this model has a total-charge embedding (max_total_charge), which mace-torch cannot express")
    if cfg.long_range is not None:
        raise ValueError("this model has a long-range charge head, which mace-torch's MACE/ScaleShiftMACE cannot "
                         "express")


def _run(mace_python: str, *args: str) -> str:
    if not Path(mace_python).is_file():
        raise ValueError(f"--mace-python {mace_python} does not exist; bash scripts/setup_mace_venv.sh DIR")
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([mace_python, str(DUMPER), *args], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode == 3:
        raise ValueError(f"--mace-python {mace_python} cannot import mace-torch")
    if proc.returncode != 0:
        raise ValueError(f"the mace side failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def _signs_of_columns(nu: int, max_ell: int, L: int, signs: dict) -> torch.Tensor:
    """mace column k = s_k * our column k of the symmetrised product basis (unreduced trees)."""
    ours = symmetric_basis(nu, max_ell, L)
    mace = symmetrize(coupling_trees(nu, max_ell, L, signs), nu)
    same = ((ours - mace).abs() <= 1e-12).flatten(0, 1).all(dim=0)
    flipped = ((ours + mace).abs() <= 1e-12).flatten(0, 1).all(dim=0)
    if not bool((same | flipped).all()):
        raise ValueError(f"product basis nu={nu}, L={L} is not a signed copy of mace's; cannot export")
    return torch.where(same, 1.0, -1.0).to(torch.float64)


def mace_tensors(model, signs: dict) -> dict[str, torch.Tensor]:
    """The backbone's weights in mace's state_dict layout (float64), silu constants left as foundation's."""
    cfg, sd = model.config, {k: v.detach().double() for k, v in model.state_dict().items()}
    c, H, hid = cfg.num_channels, len(cfg.heads), cfg.readout_mlp
    out = {"node_embedding.linear.weight": sd["embedding.weight"].reshape(-1)}
    for t in range(cfg.num_layers):
        last = t == cfg.num_layers - 1
        l_in, l_out = (0 if t == 0 else cfg.max_L), (0 if last else cfg.max_L)
        pre, paths = f"interactions.{t}", conv_paths(l_in, cfg.max_ell)
        out[f"{pre}.linear_up.weight"] = torch.cat([sd[f"{pre}.linear_up.weights.{l}"].reshape(-1)
                                                    for l in range(l_in + 1)])
        n_layers = len(cfg.radial_mlp) + 1
        for k in range(n_layers):
            w = sd[f"{pre}.radial.weights.{k}"]
            if k == n_layers - 1:
                ours = [(l1, l2, l3) for l1, l3 in sorted({(p[0], p[2]) for p in paths})
                        for l2 in sorted(p[1] for p in paths if (p[0], p[2]) == (l1, l3))]
                w = w.view(w.shape[0], len(paths), c)[:, [ours.index(p) for p in paths]].reshape(w.shape[0], -1)
            out[f"{pre}.conv_tp_weights.layer{k}.weight"] = w
        out[f"{pre}.linear.weight"] = torch.cat([sd[f"{pre}.linear.{l3}"].reshape(-1)
                                                 for l3 in range(cfg.max_ell + 1)])
        plain = t == 0 and cfg.first_interaction == "plain"
        skip = "element_mix" if plain else f"skips.{t}"
        n_l = cfg.max_ell + 1 if plain else min(l_in, l_out) + 1
        out[f"{pre}.skip_tp.weight"] = torch.cat([sd[f"{skip}.weights.{l}"].permute(1, 0, 2).reshape(-1)
                                                  for l in range(n_l)])
        if cfg.interaction_norm == "density":
            out[f"{pre}.density_fn.layer0.weight"] = sd[f"interactions.{t}.density"]
        for L in range(l_out + 1):
            cpre = f"products.{t}.symmetric_contractions.contractions.{L}"
            for nu in range(1, cfg.correlation + 1):
                key = f"{cpre}.weights_max" if nu == cfg.correlation else f"{cpre}.weights.{cfg.correlation - 1 - nu}"
                s = _signs_of_columns(nu, cfg.max_ell, L, signs)
                out[key] = sd[f"products.{t}.weights.L{L}_nu{nu}"] * s.view(1, -1, 1)
        out[f"products.{t}.linear.weight"] = torch.cat([sd[f"product_linears.{t}.weights.{l}"].reshape(-1)
                                                        for l in range(l_out + 1)])
        if not last:
            out[f"readouts.{t}.linear.weight"] = sd[f"readouts.{t}.weight"].reshape(-1)
        else:
            out[f"readouts.{t}.linear_1.weight"] = sd[f"readouts.{t}.weight_in"].permute(1, 0, 2).reshape(-1)
            w2 = torch.zeros(H, hid, H, dtype=torch.float64)
            for h in range(H):
                w2[h, :, h] = sd[f"readouts.{t}.weight_out"][h] / (hid / (hid * H)) ** 0.5
            out[f"readouts.{t}.linear_2.weight"] = w2.reshape(-1)
    return out


def export_spec(cfg: ModelConfig) -> dict:
    """Constructor arguments of the mace ScaleShiftMACE (export.json)."""
    from ase.data import atomic_numbers
    density = cfg.interaction_norm == "density"
    first = {("plain", False): "RealAgnosticInteractionBlock",
             ("residual", False): "RealAgnosticResidualInteractionBlock",
             ("plain", True): "RealAgnosticDensityInteractionBlock",
             ("residual", True): "RealAgnosticDensityResidualInteractionBlock"}[(cfg.first_interaction, density)]
    e0 = [cfg.atomic_energies[h] for h in cfg.heads]
    return {"dtype": cfg.dtype, "r_max": cfg.r_max, "num_bessel": cfg.num_bessel, "p": cfg.num_poly_cutoff,
            "max_ell": cfg.max_ell, "interaction_first": first,
            "interaction": "RealAgnosticDensityResidualInteractionBlock" if density
            else "RealAgnosticResidualInteractionBlock", "num_interactions": cfg.num_layers,
            "hidden_irreps": "+".join(f"{cfg.num_channels}x{l}{'e' if l % 2 == 0 else 'o'}"
                                      for l in range(cfg.max_L + 1)),
            "MLP_irreps": f"{cfg.readout_mlp}x0e", "atomic_energies": e0 if len(e0) > 1 else e0[0],
            "avg_num_neighbors": cfg.avg_num_neighbors, "atomic_numbers": [atomic_numbers[s] for s in cfg.elements],
            "correlation": cfg.correlation, "radial_MLP": list(cfg.radial_mlp),
            "pair_repulsion": cfg.pair_repulsion is not None,
            "distance_transform": "Agnesi" if cfg.distance_transform else "None",
            "scale": [cfg.scale[h] for h in cfg.heads], "shift": [cfg.shift[h] for h in cfg.heads],
            "heads": list(cfg.heads), "act_constant_foundation": SILU_NORM}


def export_mace(model_dir: str | Path, out_file: str | Path, mace_python: str) -> Path:
    """Write ``out_file`` (.model) from a saved model, via the mace environment at ``mace_python``."""
    from safetensors.torch import save_file

    from ..model.backbone import FoundationModel
    model = FoundationModel.from_pretrained(model_dir)
    check_exportable(model.config)
    out_file = Path(out_file)
    if out_file.exists():
        raise ValueError(f"--out {out_file} exists; choose a new file")
    env = json.loads(_run(mace_python, "--environment").strip().splitlines()[-1])
    tensors = mace_tensors(model, w3j_signs(env["w3j_signature"]))
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "export.json").write_text(json.dumps(export_spec(model.config)))
        staged = out_file.with_name(f".{out_file.name}.partial")
        _run(mace_python, "--build", tmp, str(staged))
        staged.rename(out_file)
    return out_file


def main(args) -> int:
    """CLI entry (``foundation export mace``)."""
    path = export_mace(args.model, args.out, args.mace_python)
    print(f"exported {args.model} -> {path}")
    return 0
