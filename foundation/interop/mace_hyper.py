"""mace-torch hyperparameters (a dump's hyper.json) -> ``ModelConfig``, refusing what the backbone cannot express.

Every refusal names the mace component (class or setting) and why. Supported: mace-torch 0.3.x models of class
MACE or ScaleShiftMACE with RealAgnostic[Density][Residual]InteractionBlock layers, Bessel radial basis with the
polynomial cutoff, optional Agnesi distance transform and ZBL pair repulsion, one or several heads.
"""
from __future__ import annotations

import math
import re

from ase.data import chemical_symbols

from ..model.config import ModelConfig

SUPPORTED_VERSIONS = re.compile(r"^0\.3\.\d+")
MODEL_CLASSES = ("MACE", "ScaleShiftMACE")
FIRST_BLOCKS = {"RealAgnosticResidualInteractionBlock": ("residual", "average"),
                "RealAgnosticInteractionBlock": ("plain", "average"),
                "RealAgnosticDensityResidualInteractionBlock": ("residual", "density"),
                "RealAgnosticDensityInteractionBlock": ("plain", "density")}
LATER_BLOCKS = {"RealAgnosticResidualInteractionBlock": "average",
                "RealAgnosticDensityResidualInteractionBlock": "density"}


class UnsupportedMace(ValueError):
    """A mace model uses a component the backbone cannot express; the message names it."""


def refuse(component: str, why: str) -> None:
    raise UnsupportedMace(f"mace component {component} is not supported by foundation's import: {why}")


def parse_irreps(text: str) -> list[tuple[int, int, str]]:
    """'128x0e+128x1o' -> [(128, 0, 'e'), (128, 1, 'o')]."""
    out = []
    for part in text.replace(" ", "").split("+"):
        m = re.fullmatch(r"(\d+)x(\d+)([eo])", part)
        if not m:
            raise ValueError(f"cannot read irreps {text!r} (part {part!r})")
        out.append((int(m.group(1)), int(m.group(2)), m.group(3)))
    return out


def hidden_shape(text: str, what: str) -> tuple[int, int]:
    """C x (0e + 1o + ... + L) -> (C, L); anything else is refused."""
    irreps = parse_irreps(text)
    muls = {m for m, _, _ in irreps}
    ls = [l for _, l, _ in irreps]
    natural = all(p == ("e" if l % 2 == 0 else "o") for _, l, p in irreps)
    if len(muls) != 1 or ls != list(range(len(ls))) or not natural:
        refuse(f"hidden irreps {text!r} ({what})", "the backbone needs C x (0e + 1o + ... + L) with one C")
    return muls.pop(), ls[-1]


def check_version(hyper: dict) -> str:
    version = str(hyper.get("versions", {}).get("mace", ""))
    if not SUPPORTED_VERSIONS.match(version):
        raise ValueError(f"hyper.json: the dump was made with mace-torch {version or '(unknown)'}; this importer "
                         "supports mace-torch 0.3.x dumps. Re-dump with mace-torch 0.3.x (its loader also reads "
                         "older .model files): bash scripts/setup_mace_venv.sh, then --mace-python")
    if hyper.get("dump_format") != 1:
        raise ValueError(f"hyper.json: dump_format {hyper.get('dump_format')!r} is unknown (expected 1); re-dump the "
                         "model with the mace_dump.py shipped with this foundation version")
    return version


def _blocks(hyper: dict) -> tuple[str, str]:
    names = [b["class"] for b in hyper["interactions"]]
    if names[0] not in FIRST_BLOCKS:
        refuse(names[0], f"first interaction block; supported: {sorted(FIRST_BLOCKS)}")
    first, norm = FIRST_BLOCKS[names[0]]
    for name in names[1:]:
        if name not in LATER_BLOCKS:
            refuse(name, f"interaction block after the first; supported: {sorted(LATER_BLOCKS)}")
        if LATER_BLOCKS[name] != norm:
            refuse(f"{names[0]} + {name}", "mixing density-normalised and average-normalised layers")
    return first, norm


def _radial(hyper: dict) -> tuple[int, int]:
    radial = hyper["radial"]
    if radial["basis"] != "BesselBasis":
        refuse(radial["basis"], "radial basis; only BesselBasis (mace's default) is implemented")
    if radial["cutoff"] != "PolynomialCutoff":
        refuse(radial["cutoff"], "cutoff function; only PolynomialCutoff is implemented")
    if not radial.get("apply_cutoff", True):
        refuse("RadialEmbeddingBlock(apply_cutoff=False)", "the envelope is always applied to the radial features")
    p = radial["p"]
    if p != int(p) or p < 2:
        refuse(f"PolynomialCutoff(p={p})", "p must be an integer >= 2")
    n = int(radial["num_basis"])
    expected = [k * math.pi / hyper["r_max"] for k in range(1, n + 1)]
    got = radial.get("bessel_weights", expected)
    if any(abs(a - b) > 1e-6 * abs(b) for a, b in zip(got, expected)):
        refuse("BesselBasis(trainable=True) with trained frequencies", "the backbone's frequencies are n pi / r_max")
    return n, int(p)


def _per_element(values: list[float], numbers: list[int]) -> list[float]:
    """A table indexed by atomic number (mace's covalent radii buffers) -> the model's elements."""
    return [float(values[z]) for z in numbers]


def _transform(hyper: dict, numbers: list[int]) -> dict | None:
    name = hyper["radial"].get("distance_transform")
    if name is None:
        return None
    if name != "AgnesiTransform":
        refuse(name, "distance transform; only AgnesiTransform is implemented")
    params = hyper["radial"]["transform_params"]
    return {"kind": "agnesi", "q": float(params["q"]), "p": float(params["p"]), "a": float(params["a"]),
            "covalent_radii": _per_element(params["covalent_radii"], numbers)}


def _pair(hyper: dict, numbers: list[int]) -> dict | None:
    if not hyper.get("pair_repulsion"):
        return None
    name = hyper.get("pair_repulsion_class")
    if name != "ZBLBasis":
        refuse(str(name), "pair repulsion; only ZBLBasis is implemented")
    params = hyper["pair_repulsion_params"]
    p = params.get("p", hyper.get("pair_repulsion_p"))
    return {"kind": "zbl", "p": float(p), "a_exp": float(params["a_exp"]), "a_prefactor": float(params["a_prefactor"]),
            "c": [float(v) for v in params["c"]], "covalent_radii": _per_element(params["covalent_radii"], numbers)}


def _heads_stats(hyper: dict, heads: list[str], num_el: int) -> tuple[dict, dict, dict]:
    e0 = hyper["atomic_energies"]
    rows = e0 if e0 and isinstance(e0[0], list) else [e0]
    if len(rows) != len(heads) or any(len(r) != num_el for r in rows):
        raise ValueError(f"hyper.json: atomic_energies has shape {len(rows)} x {len(rows[0])}, expected one row of "
                         f"{num_el} per head {heads}")
    energies = {h: [float(v) for v in r] for h, r in zip(heads, rows)}
    ss = hyper.get("scale_shift")
    if hyper["model_class"] == "MACE" or ss is None:
        return energies, {h: 1.0 for h in heads}, {h: 0.0 for h in heads}

    def per_head(v):
        v = v if isinstance(v, list) else [v]
        v = v * len(heads) if len(v) == 1 else v
        if len(v) != len(heads):
            raise ValueError(f"hyper.json: scale_shift has {len(v)} values for heads {heads}")
        return {h: float(x) for h, x in zip(heads, v)}
    return energies, per_head(ss["scale"]), per_head(ss["shift"])


def config_from_hyper(hyper: dict) -> ModelConfig:
    """Check that the dump is importable and build the matching ``ModelConfig`` (energy_form "mace")."""
    check_version(hyper)
    if hyper["model_class"] not in MODEL_CLASSES:
        refuse(hyper["model_class"], f"model class; supported: {list(MODEL_CLASSES)}")
    if hyper.get("other_modules"):
        refuse(", ".join(hyper["other_modules"]), "extra model modules (e.g. long-range or embeddings of charge/spin)")
    if not hyper.get("sh_normalize", True) or hyper.get("sh_normalization", "component") != "component":
        refuse("SphericalHarmonics normalisation", "only normalize=True with 'component' normalisation")
    numbers = hyper["atomic_numbers"]
    first, norm = _blocks(hyper)
    num_bessel, p = _radial(hyper)
    c, max_l = hidden_shape(hyper["products"][0]["irreps_out"], "products.0")
    corr = {k for prod in hyper["products"] for k in prod["correlation"]}
    if len(corr) != 1:
        refuse(f"correlation {sorted(corr)}", "one correlation order for every layer and output irrep")
    mlp = hyper["interactions"][0]["radial_mlp"]
    if any(b["radial_mlp"][1:-1] != mlp[1:-1] for b in hyper["interactions"]):
        refuse("radial MLPs of different widths per layer", "one radial_mlp for every layer")
    avg = {round(b["avg_num_neighbors"], 12) for b in hyper["interactions"]}
    if len(avg) != 1:
        refuse(f"avg_num_neighbors {sorted(avg)} per layer", "one value for every layer")
    heads = [str(h) for h in hyper["heads"]]
    last = hyper["readouts"][-1]
    linear = [r["class"] for r in hyper["readouts"][:-1]]
    if last["class"] != "NonLinearReadoutBlock" or any(name != "LinearReadoutBlock" for name in linear):
        refuse(str([r["class"] for r in hyper["readouts"]]), "readouts must be linear, then one NonLinearReadoutBlock")
    hidden = sum(m for m, _, _ in parse_irreps(last["hidden_irreps"]))
    energies, scale, shift = _heads_stats(hyper, heads, len(numbers))
    return ModelConfig(
        elements=[chemical_symbols[z] for z in numbers], r_max=float(hyper["r_max"]), num_channels=c, max_L=max_l,
        max_ell=int(hyper["max_ell"]), num_layers=int(hyper["num_interactions"]), correlation=corr.pop(),
        num_bessel=num_bessel, num_poly_cutoff=p, radial_mlp=[int(w) for w in mlp[1:-1]],
        readout_mlp=hidden // len(heads), heads=heads, atomic_energies=energies, scale=scale, shift=shift,
        avg_num_neighbors=float(hyper["interactions"][0]["avg_num_neighbors"]), dtype=hyper["dtype"],
        energy_form="mace", first_interaction=first, interaction_norm=norm,
        distance_transform=_transform(hyper, numbers), pair_repulsion=_pair(hyper, numbers))
