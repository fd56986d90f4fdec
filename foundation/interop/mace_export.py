"""``foundation export mace``: a saved ``FoundationModel`` -> a mace-torch ``.model`` file (MACE / ScaleShiftMACE).

The backbone's tensors are mapped back to mace's state_dict layout here (the inverse of ``mace_weights``), with
every value-bearing buffer mace keeps (E0 per head, scale/shift per head, r_max, Bessel frequencies and prefactor,
cutoff p, Agnesi and ZBL constants with their 119-entry covalent-radius tables, atomic numbers) and the silu
constant folded back to mace's e3nn constant in float64 (``mace_weights.act_ratio``, the same float the import
multiplied by). They are written as safetensors + export.json; the last step runs in the mace environment
(``mace_dump.py --build`` under ``--mace-python``): it builds the mace model, overwrites its buffers with the
exported values, loads strictly and checks the built model's hyperparameters against export.json.

Only what mace can express is exported: the "mace" energy form (imported models and their fine-tunes), two or
more layers, no charge embedding, no long-range head, no unmerged LoRA adapters.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..nn.cg import conv_paths, coupling_trees, symmetric_basis, symmetrize
from .mace import run_mace_side
from .mace_weights import act_ratio, grouped_paths, readout_factor, w3j_signs

F64 = torch.float64


def refuse_lora(keys, where: str) -> None:
    """ValueError naming the first unmerged LoRA adapter among the state-dict ``keys`` of ``where``, if any."""
    from ..finetune.surgery import lora_keys
    adapters = lora_keys(keys)
    if adapters:
        raise ValueError(f"{where} has unmerged LoRA adapters ({adapters[0]}, ... {len(adapters)} tensors), which "
                         "mace-torch cannot express; merge them first (foundation.finetune.surgery.merged_copy, or "
                         "export the fine-tune run's saved model, whose adapters are merged)")


def check_exportable(model_or_config, keys=None) -> None:
    """Refuse, naming it, what mace-torch cannot express. ``model_or_config``: a ``FoundationModel`` (its state
    dict is checked for LoRA adapters) or a ``ModelConfig``; ``keys``: state-dict keys of a weights file."""
    cfg = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    if keys is None and not isinstance(model_or_config, ModelConfig):
        keys = model_or_config.state_dict().keys()
    refuse_lora(keys or [], "this model")
    if cfg.energy_form != "mace":
        raise ValueError("this model uses foundation's faded energy assembly (isolated atoms get exactly E0), which "
                         "mace-torch cannot express; only imported mace models and their fine-tunes export")
    if cfg.max_total_charge:
        raise ValueError("this model has a total-charge embedding (max_total_charge), which mace-torch cannot express")
    if cfg.long_range is not None:
        raise ValueError("this model has a long-range charge head, which mace-torch's MACE/ScaleShiftMACE cannot "
                         "express")
    if cfg.num_layers < 2:
        raise ValueError("this model has one layer; mace-torch's one-layer models have a linear readout only, which "
                         "this backbone's non-linear last readout cannot be mapped to")
    p = (cfg.pair_repulsion or {}).get("p", 5)
    if p != int(p):
        raise ValueError(f"pair_repulsion p = {p} is not an integer; mace-torch's ZBLBasis stores p as an integer")


def _signs_of_columns(nu: int, max_ell: int, L: int, signs: dict) -> torch.Tensor:
    """mace column k = s_k * our column k of the symmetrised product basis (unreduced trees)."""
    ours = symmetric_basis(nu, max_ell, L)
    mace = symmetrize(coupling_trees(nu, max_ell, L, signs), nu)
    same = ((ours - mace).abs() <= 1e-12).flatten(0, 1).all(dim=0)
    flipped = ((ours + mace).abs() <= 1e-12).flatten(0, 1).all(dim=0)
    if not bool((same | flipped).all()):
        raise ValueError(f"product basis nu={nu}, L={L} is not a signed copy of mace's; cannot export")
    return torch.where(same, 1.0, -1.0).to(F64)


def _interaction(cfg: ModelConfig, sd: dict, t: int, ratio: float) -> dict:
    """interactions.t.*: linear_up (l blocks), radial MLP (silu fold on layers > 0, columns in mace's instruction
    order), linear (paths grouped by l3), skip_tp (element-mixing blocks (C, N_el, C)), density MLP."""
    c, pre = cfg.num_channels, f"interactions.{t}"
    l_in, l_out = (0 if t == 0 else cfg.max_L), (0 if t == cfg.num_layers - 1 else cfg.max_L)
    paths = conv_paths(l_in, cfg.max_ell)
    out = {f"{pre}.linear_up.weight": torch.cat([sd[f"{pre}.linear_up.weights.{l}"].reshape(-1)
                                                 for l in range(l_in + 1)])}
    n_layers = len(cfg.radial_mlp) + 1
    for k in range(n_layers):
        w = sd[f"{pre}.radial.weights.{k}"]
        if k > 0:
            w = w / ratio
        if k == n_layers - 1:
            ours = grouped_paths(paths)
            w = w.view(w.shape[0], len(paths), c)[:, [ours.index(p) for p in paths]].reshape(w.shape[0], -1)
        out[f"{pre}.conv_tp_weights.layer{k}.weight"] = w
    out[f"{pre}.linear.weight"] = torch.cat([sd[f"{pre}.linear.{l3}"].reshape(-1) for l3 in range(cfg.max_ell + 1)])
    plain = t == 0 and cfg.first_interaction == "plain"
    skip, n_l = ("element_mix", cfg.max_ell + 1) if plain else (f"skips.{t}", min(l_in, l_out) + 1)
    out[f"{pre}.skip_tp.weight"] = torch.cat([sd[f"{skip}.weights.{l}"].permute(1, 0, 2).reshape(-1)
                                              for l in range(n_l)])
    if cfg.interaction_norm == "density":
        out[f"{pre}.density_fn.layer0.weight"] = sd[f"{pre}.density"]
    return out


def _product(cfg: ModelConfig, sd: dict, t: int, signs: dict) -> dict:
    """products.t.*: symmetric-contraction weights (signed columns of mace's unreduced U basis) and the linear."""
    out, l_out = {}, 0 if t == cfg.num_layers - 1 else cfg.max_L
    for L in range(l_out + 1):
        cpre = f"products.{t}.symmetric_contractions.contractions.{L}"
        for nu in range(1, cfg.correlation + 1):
            key = f"{cpre}.weights_max" if nu == cfg.correlation else f"{cpre}.weights.{cfg.correlation - 1 - nu}"
            s = _signs_of_columns(nu, cfg.max_ell, L, signs)
            out[key] = sd[f"products.{t}.weights.L{L}_nu{nu}"] * s.view(1, -1, 1)
    out[f"products.{t}.linear.weight"] = torch.cat([sd[f"product_linears.{t}.weights.{l}"].reshape(-1)
                                                    for l in range(l_out + 1)])
    return out


def _readout(cfg: ModelConfig, sd: dict, t: int, act: float) -> dict:
    """readouts.t.*: linear (C, H) before the last layer; linear_1 (C, H x hidden) and linear_2 (H x hidden, H)
    in the last, linear_2 block-diagonal (mace masks the hidden block of every other head, so the off-diagonal
    blocks are never read; they are written as zeros)."""
    if t < cfg.num_layers - 1:
        return {f"readouts.{t}.linear.weight": sd[f"readouts.{t}.weight"].reshape(-1)}
    H, hid = len(cfg.heads), cfg.readout_mlp
    factor = readout_factor(act, hid, H)
    w2 = torch.zeros(H, hid, H, dtype=F64)
    for h in range(H):
        w2[h, :, h] = sd[f"readouts.{t}.weight_out"][h] / factor
    return {f"readouts.{t}.linear_1.weight": sd[f"readouts.{t}.weight_in"].permute(1, 0, 2).reshape(-1),
            f"readouts.{t}.linear_2.weight": w2.reshape(-1)}


def radii_table(radii: list[float], elements: list[str]) -> torch.Tensor:
    """mace's covalent-radius buffer (119,) Å: ase's table with the model's own values for its elements."""
    from ase.data import atomic_numbers, covalent_radii
    table = torch.tensor(covalent_radii, dtype=F64)
    for symbol, r in zip(elements, radii):
        table[atomic_numbers[symbol]] = r
    return table


def mace_buffers(model, model_class: str = "ScaleShiftMACE") -> dict[str, torch.Tensor]:
    """Every value-bearing mace buffer (float64 unless mace keeps an integer): E0 (H, N_el) eV (N_el,) for one
    head, scale/shift (H,), r_max Å, Bessel frequencies 1/Å (the backbone's own) and prefactor, cutoff p,
    Agnesi q/p/a and ZBL a_exp/a_prefactor/c/p with covalent radii (119,) Å, atomic numbers, layer count."""
    cfg = model.config
    from ase.data import atomic_numbers
    f64 = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    e0 = f64([cfg.atomic_energies[h] for h in cfg.heads])
    out = {"atomic_numbers": torch.tensor([atomic_numbers[s] for s in cfg.elements], dtype=torch.int64),
           "num_interactions": torch.tensor(cfg.num_layers, dtype=torch.int64), "r_max": f64(cfg.r_max),
           "atomic_energies_fn.atomic_energies": e0 if len(cfg.heads) > 1 else e0[0],
           "radial_embedding.bessel_fn.bessel_weights": dict(model.named_buffers())["radial_basis.freq"].to(F64),
           "radial_embedding.bessel_fn.r_max": f64(cfg.r_max),
           "radial_embedding.bessel_fn.prefactor": f64(math.sqrt(2.0 / cfg.r_max)),
           "radial_embedding.cutoff_fn.r_max": f64(cfg.r_max),
           "radial_embedding.cutoff_fn.p": torch.tensor(cfg.num_poly_cutoff, dtype=torch.int32)}
    if model_class == "ScaleShiftMACE":
        out["scale_shift.scale"] = f64([cfg.scale[h] for h in cfg.heads])
        out["scale_shift.shift"] = f64([cfg.shift[h] for h in cfg.heads])
    if cfg.distance_transform:
        d, pre = cfg.distance_transform, "radial_embedding.distance_transform"
        out.update({f"{pre}.{k}": f64(d[k]) for k in ("a", "p", "q")})
        out[f"{pre}.covalent_radii"] = radii_table(d["covalent_radii"], cfg.elements)
    if cfg.pair_repulsion:
        z = cfg.pair_repulsion
        out.update({f"pair_repulsion_fn.{k}": f64(z[k]) for k in ("a_exp", "a_prefactor", "c")})
        out["pair_repulsion_fn.p"] = torch.tensor(int(z["p"]), dtype=torch.int32)
        out["pair_repulsion_fn.covalent_radii"] = radii_table(z["covalent_radii"], cfg.elements)
    return out


def mace_tensors(model, signs: dict, act_constant: float, model_class: str = "ScaleShiftMACE") -> dict:
    """mace's state_dict values for ``model``: weights in mace's layouts (float64, silu constant folded back to
    ``act_constant``, the mace environment's e3nn constant) and ``mace_buffers``. ``signs``: ``w3j_signs`` of
    that environment. Structural buffers (e3nn output masks, w3j tables, U matrices) are left to mace."""
    cfg, sd = model.config, {k: v.detach().to(F64) for k, v in model.state_dict().items()}
    ratio = act_ratio(act_constant)
    out = {"node_embedding.linear.weight": sd["embedding.weight"].reshape(-1)}
    for t in range(cfg.num_layers):
        out.update(_interaction(cfg, sd, t, ratio))
        out.update(_product(cfg, sd, t, signs))
        out.update(_readout(cfg, sd, t, act_constant))
    out.update(mace_buffers(model, model_class))
    return out


def mace_class(cfg: ModelConfig, provenance: dict | None = None) -> str:
    """"MACE" when the model was imported from a plain MACE and its scale/shift are still 1/0 (the same energy),
    else "ScaleShiftMACE" (which expresses every scale/shift)."""
    trivial = all(cfg.scale[h] == 1.0 and cfg.shift[h] == 0.0 for h in cfg.heads)
    return "MACE" if trivial and (provenance or {}).get("model_class") == "MACE" else "ScaleShiftMACE"


def export_spec(cfg: ModelConfig, act_constant: float, model_class: str = "ScaleShiftMACE") -> dict:
    """Constructor arguments of the mace model (export.json); ``mace_dump.spec_mismatches`` checks them against
    ``mace_dump.hyperparameters`` of the built model."""
    from ase.data import atomic_numbers
    density = cfg.interaction_norm == "density"
    first = {("plain", False): "RealAgnosticInteractionBlock",
             ("residual", False): "RealAgnosticResidualInteractionBlock",
             ("plain", True): "RealAgnosticDensityInteractionBlock",
             ("residual", True): "RealAgnosticDensityResidualInteractionBlock"}[(cfg.first_interaction, density)]
    e0 = [cfg.atomic_energies[h] for h in cfg.heads]
    return {"model_class": model_class, "dtype": cfg.dtype, "r_max": cfg.r_max, "num_bessel": cfg.num_bessel,
            "p": cfg.num_poly_cutoff, "max_ell": cfg.max_ell, "interaction_first": first,
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
            "heads": list(cfg.heads), "act_constant": act_constant}


def _load(model) -> object:
    """A ``FoundationModel`` from a saved directory (LoRA keys in its weights refused before loading) or as is."""
    if not isinstance(model, (str, Path)):
        return model
    from safetensors import safe_open

    from ..model.backbone import FoundationModel
    weights = Path(model) / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            refuse_lora(f.keys(), str(weights))
    return FoundationModel.from_pretrained(model)


def export_mace(model, out_file: str | Path, mace_python: str) -> Path:
    """Write ``out_file`` (.model) from ``model`` (a saved model directory or a ``FoundationModel``), via the mace
    environment at ``mace_python``; nothing is written to ``out_file`` unless every step succeeds."""
    from safetensors.torch import save_file
    model = _load(model)
    check_exportable(model)
    out_file = Path(out_file)
    if out_file.exists():
        raise ValueError(f"--out {out_file} exists; choose a new file")
    env = json.loads(run_mace_side(mace_python, "--environment").strip().splitlines()[-1])
    cls = mace_class(model.config, (getattr(model, "hub_metadata", None) or {}).get("provenance"))
    tensors = mace_tensors(model, w3j_signs(env["w3j_signature"]), env["act_constant"], cls)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        spec = export_spec(model.config, env["act_constant"], cls)
        (Path(tmp) / "export.json").write_text(json.dumps(spec))
        staged = out_file.with_name(f".{out_file.name}.partial")
        try:
            run_mace_side(mace_python, "--build", tmp, str(staged))
            staged.rename(out_file)
        finally:
            staged.unlink(missing_ok=True)
    return out_file


def main(args) -> int:
    """CLI entry (``foundation export mace``)."""
    path = export_mace(args.model, args.out, args.mace_python)
    print(f"exported {args.model} -> {path}")
    return 0
