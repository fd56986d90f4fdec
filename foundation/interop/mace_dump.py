"""Standalone mace-torch dumper: a ``.model`` file -> ``model.safetensors`` (state_dict) + ``hyper.json``.

Runs in the user's mace-torch environment (torch + mace-torch + the standard library; it never imports
``foundation``, which lives in another environment with another e3nn):

    <mace-venv>/bin/python mace_dump.py MODEL.model OUT_DIR
    <mace-venv>/bin/python mace_dump.py --build EXPORT_DIR OUT.model     (``foundation export mace``'s last step)
    <mace-venv>/bin/python mace_dump.py --environment                    (w3j signature, silu constant as JSON)

It is the only place where a mace ``.model`` pickle is loaded, in that separate process. OUT_DIR receives
``model.safetensors`` (every tensor of the state_dict, written with a small safetensors writer so that the
mace environment needs no extra package) and ``hyper.json``: the hyperparameters read from the model object
(class names of every block, radial basis, cutoff, distance transform, pair repulsion, correlation per layer,
hidden irreps, heads, atomic energies, scale/shift, r_max, avg_num_neighbors, atomic numbers, dtype, the
activation normalisation constants) and the versions of mace-torch, e3nn and torch. Lengths Å, energies eV.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

DUMP_FORMAT = 1
_ST_DTYPES = {"torch.float64": "F64", "torch.float32": "F32", "torch.int64": "I64", "torch.int32": "I32",
              "torch.bool": "BOOL", "torch.float16": "F16", "torch.uint8": "U8", "torch.int8": "I8"}


def write_safetensors(tensors: dict, path: Path) -> None:
    """Write {name: torch.Tensor} in the safetensors format (8-byte header length, JSON header, raw data)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if str(t.dtype) not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the dumper does not write")
        data = t.numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: Path) -> dict:
    """{name: torch.Tensor} from a safetensors file (the format ``write_safetensors`` writes)."""
    import numpy as np
    import torch
    types = {"F64": np.float64, "F32": np.float32, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        array = np.frombuffer(data[8 + size + start:8 + size + stop], dtype=types[info["dtype"]])
        out[name] = torch.from_numpy(array.copy()).reshape(info["shape"])
    return out


def _float(x) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def _floats(x) -> list:
    return x.detach().cpu().double().tolist() if hasattr(x, "detach") else x


def _act_constant(module) -> float | None:
    """The normalize2mom constant of an e3nn activation inside ``module`` (None when there is none)."""
    for sub in module.modules():
        if type(sub).__name__ == "normalize2mom":
            return _float(sub.cst)
    return None


def _radial(model) -> dict:
    emb = model.radial_embedding
    basis, cutoff = emb.bessel_fn, emb.cutoff_fn
    out = {"class": type(emb).__name__, "basis": type(basis).__name__, "num_basis": int(emb.out_dim),
           "cutoff": type(cutoff).__name__, "p": _float(cutoff.p), "r_max": _float(cutoff.r_max)}
    if hasattr(basis, "bessel_weights"):
        out["bessel_weights"] = _floats(basis.bessel_weights)
        out["bessel_trainable"] = bool(getattr(basis.bessel_weights, "requires_grad", False))
    transform = getattr(emb, "distance_transform", None)
    out["distance_transform"] = None if transform is None else type(transform).__name__
    if transform is not None:
        out["transform_params"] = {k: _floats(v) for k, v in transform.state_dict().items()}
    out["apply_cutoff"] = bool(getattr(emb, "apply_cutoff", True))
    return out


def _interaction(block) -> dict:
    mlp = block.conv_tp_weights
    sizes = [int(s) for s in getattr(mlp, "hs", [])]
    info = {"class": type(block).__name__, "irreps_in": str(block.node_feats_irreps),
            "target_irreps": str(block.target_irreps), "hidden_irreps": str(block.hidden_irreps),
            "sh_irreps": str(block.edge_attrs_irreps),
            "edge_irreps": str(getattr(block, "edge_irreps", block.node_feats_irreps)),
            "avg_num_neighbors": _float(block.avg_num_neighbors),
            "radial_mlp": sizes, "radial_act_constant": _act_constant(mlp),
            "has_skip_tp": hasattr(block, "skip_tp"), "has_density": hasattr(block, "density_fn"),
            "conv_tp_instructions": [list(i[:5]) for i in getattr(block.conv_tp, "instructions", [])]}
    if hasattr(block, "density_fn"):
        info["density_act_constant"] = _act_constant(block.density_fn)
    return info


def _product(block) -> dict:
    sc = block.symmetric_contractions
    contractions = getattr(sc, "contractions", [])
    return {"class": type(block).__name__, "correlation": [int(c.correlation) for c in contractions],
            "irreps_out": str(getattr(sc, "irreps_out", "")), "use_sc": bool(getattr(block, "use_sc", True)),
            "contraction_class": type(sc).__name__}


def _readout(block) -> dict:
    info = {"class": type(block).__name__}
    if hasattr(block, "linear_1"):
        info["hidden_irreps"] = str(block.linear_1.irreps_out)
        info["act_constant"] = _act_constant(block)
    info["num_heads"] = int(getattr(block, "num_heads", 1))
    return info


def hyperparameters(model) -> dict:
    """Everything ``foundation.interop.mace`` needs besides the state_dict, read from a mace model object."""
    import e3nn
    import mace
    import torch
    dtype = next(model.parameters()).dtype
    energies = model.atomic_energies_fn.atomic_energies
    hyper = {
        "dump_format": DUMP_FORMAT, "model_class": type(model).__name__,
        "versions": {"mace": mace.__version__, "e3nn": e3nn.__version__, "torch": torch.__version__},
        "dtype": str(dtype).replace("torch.", ""),
        "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
        "r_max": _float(model.r_max), "num_interactions": int(_float(model.num_interactions)),
        "max_ell": int(model.spherical_harmonics._lmax),
        "sh_normalization": str(getattr(model.spherical_harmonics, "normalization", "component")),
        "sh_normalize": bool(getattr(model.spherical_harmonics, "normalize", True)),
        "heads": list(getattr(model, "heads", None) or ["default"]),
        "atomic_energies": _floats(energies),
        "radial": _radial(model),
        "node_embedding": {"class": type(model.node_embedding).__name__,
                           "irreps_out": str(model.node_embedding.linear.irreps_out)},
        "interactions": [_interaction(b) for b in model.interactions],
        "products": [_product(b) for b in model.products],
        "readouts": [_readout(b) for b in model.readouts],
        "pair_repulsion": hasattr(model, "pair_repulsion_fn"),
        "scale_shift": None,
    }
    if hasattr(model, "pair_repulsion_fn"):
        fn = model.pair_repulsion_fn
        hyper["pair_repulsion_class"] = type(fn).__name__
        hyper["pair_repulsion_params"] = {k: _floats(v) for k, v in fn.state_dict().items()}
        hyper["pair_repulsion_p"] = _float(getattr(fn, "p", float("nan")))
    if hasattr(model, "scale_shift"):
        hyper["scale_shift"] = {"scale": _floats(model.scale_shift.scale), "shift": _floats(model.scale_shift.shift)}
    known = {"node_embedding", "radial_embedding", "spherical_harmonics", "atomic_energies_fn", "interactions",
             "products", "readouts", "scale_shift", "pair_repulsion_fn"}
    hyper["other_modules"] = sorted(name for name, _ in model.named_children() if name not in known)
    return hyper


def coupling_bases(model, state: dict) -> dict:
    """Per U_matrix buffer: "unreduced" when it equals mace's own unreduced generalised CG (U_matrix_real with
    use_cueq_cg=False, recomputed in float64), which the importer rebuilds itself, so the buffer is dropped from
    the dump (the dense U of correlation 3 are megabytes); otherwise "stored" and the buffer stays."""
    import torch
    from e3nn import o3
    from mace.tools.cg import U_matrix_real
    bases = {}
    for i, product in enumerate(model.products):
        sc = product.symmetric_contractions
        for L, contraction in enumerate(getattr(sc, "contractions", [])):
            coupling = contraction.coupling_irreps
            for nu in range(1, int(contraction.correlation) + 1):
                key = f"products.{i}.symmetric_contractions.contractions.{L}.U_matrix_{nu}"
                buffer = state[key]
                ref = U_matrix_real(irreps_in=coupling, irreps_out=o3.Irreps(str(sc.irreps_out[L].ir)), correlation=nu,
                                    use_cueq_cg=False, dtype=torch.float64)[-1]
                same = ref.shape == buffer.shape and torch.allclose(
                    ref, buffer.double(), rtol=0, atol=1e-6 * max(1.0, float(ref.abs().max())))
                bases[key] = "unreduced" if same else "stored"
                if same:
                    del state[key]
    return bases


def w3j_signature(l_top: int = 6) -> dict:
    """{"a,b,c": [flat index, value]} of the largest entry of e3nn's wigner_3j(a, b, c), a, b, c <= l_top: the
    importer compares with its own e3nn to learn the sign convention of the generalised CG (U) matrices."""
    import torch
    from e3nn import o3
    out = {}
    for a in range(l_top + 1):
        for b in range(l_top + 1):
            for c in range(abs(a - b), min(a + b, l_top) + 1):
                w = o3.wigner_3j(a, b, c, dtype=torch.float64).flatten()
                i = int(w.abs().argmax())
                out[f"{a},{b},{c}"] = [i, float(w[i])]
    return out


def dump_model(model, out_dir: str | os.PathLike, source: dict | None = None) -> Path:
    """Write ``model``'s state_dict and hyperparameters into ``out_dir`` (created; files replaced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hyper = hyperparameters(model)
    hyper["source"] = source or {}
    state = dict(model.state_dict())
    hyper["coupling_bases"] = coupling_bases(model, state)
    hyper["w3j_signature"] = w3j_signature()
    write_safetensors(state, out / "model.safetensors")
    (out / "hyper.json").write_text(json.dumps(hyper, indent=1) + "\n")
    return out


def environment() -> dict:
    """This mace environment's w3j signature and e3nn silu normalisation constant (for ``foundation export``)."""
    import torch
    from e3nn import nn as e3nn_nn
    act = e3nn_nn.Activation("1x0e", [torch.nn.functional.silu])
    return {"w3j_signature": w3j_signature(), "act_constant": _act_constant(act)}


def is_structural(key: str, value) -> bool:
    """A buffer mace derives from the irreps alone (e3nn output masks, w3j tables, empty biases, U matrices,
    zeroed-path flags), which ``foundation export`` leaves to the constructor; every other tensor is exported."""
    parts = (".output_mask", "._w3j_", ".U_matrix_", "_zeroed")
    return any(p in key for p in parts) or (value.numel() == 0 and key.endswith((".bias", ".weight")))


def spec_mismatches(spec: dict, hyper: dict) -> list:
    """Where ``hyperparameters`` of a mace model differ from export.json's ``spec`` (empty when they agree)."""
    heads, blocks = spec["heads"], [b["class"] for b in hyper["interactions"]]
    rel = 1e-6 if spec["dtype"] == "float32" else 0.0  # r_max is a buffer of the model's dtype
    r_max = spec["r_max"] if abs(hyper["r_max"] - spec["r_max"]) <= rel * spec["r_max"] else hyper["r_max"]
    transform = None if spec["distance_transform"] == "None" else spec["distance_transform"] + "Transform"
    want = {"model_class": (hyper["model_class"], spec["model_class"]), "dtype": (hyper["dtype"], spec["dtype"]),
            "interactions": (blocks, [spec["interaction_first"]] + [spec["interaction"]] * (len(blocks) - 1)),
            "num_interactions": (hyper["num_interactions"], spec["num_interactions"]),
            "r_max": (r_max, spec["r_max"]), "max_ell": (hyper["max_ell"], spec["max_ell"]),
            "atomic_numbers": (hyper["atomic_numbers"], spec["atomic_numbers"]), "heads": (hyper["heads"], heads),
            "num_bessel": (hyper["radial"]["num_basis"], spec["num_bessel"]),
            "p": (hyper["radial"]["p"], spec["p"]), "pair_repulsion": (hyper["pair_repulsion"], spec["pair_repulsion"]),
            "distance_transform": (hyper["radial"]["distance_transform"], transform),
            "hidden_irreps": (hyper["products"][0]["irreps_out"], spec["hidden_irreps"]),
            "correlation": (sorted({c for p in hyper["products"] for c in p["correlation"]}), [spec["correlation"]]),
            "radial_MLP": ([b["radial_mlp"][1:-1] for b in hyper["interactions"]], [spec["radial_MLP"]] * len(blocks)),
            "avg_num_neighbors": ([b["avg_num_neighbors"] for b in hyper["interactions"]],
                                  [spec["avg_num_neighbors"]] * len(blocks)),
            "MLP_irreps": (hyper["readouts"][-1]["hidden_irreps"],
                           f"{len(heads) * int(spec['MLP_irreps'].split('x')[0])}x0e"),
            "act_constant": (hyper["interactions"][0]["radial_act_constant"], spec["act_constant"])}
    return [f"{k}: mace has {a!r}, export.json {b!r}" for k, (a, b) in want.items() if a != b]


def _state_from_export(model, tensors: dict) -> dict:
    """mace's state_dict with every exported tensor in place (cast once to mace's dtype); every tensor that is
    not ``is_structural`` must be exported, and nothing exported may be unknown to mace."""
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    missing = sorted(k for k, v in state.items() if k not in tensors and not is_structural(k, v))
    if unknown or missing:
        raise ValueError(f"export does not match the mace model: unknown {unknown[:5]}, missing {missing[:5]}")
    for key, value in tensors.items():
        if state[key].numel() == 0 and value.numel() > 0:
            if bool(value.abs().max() > 0):
                raise ValueError(f"{key}: mace zeroed this product path but the exported weights are not zero")
            continue
        if value.numel() != state[key].numel():
            raise ValueError(f"{key}: exported {tuple(value.shape)}, mace expects {tuple(state[key].shape)}")
        state[key] = value.to(state[key].dtype).reshape(state[key].shape)
    return state


def build_from_export(dump_dir: Path, out_file: Path) -> None:
    """Build the mace model of ``foundation export``'s export.json, overwrite its weights and buffers with the
    exported tensors (strict load), check its hyperparameters against export.json, save the .model pickle."""
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    spec = json.loads((dump_dir / "export.json").read_text())
    torch.set_default_dtype(getattr(torch, spec["dtype"]))
    kwargs = dict(
        r_max=spec["r_max"], num_bessel=spec["num_bessel"], num_polynomial_cutoff=spec["p"], max_ell=spec["max_ell"],
        interaction_cls=modules.interaction_classes[spec["interaction"]],
        interaction_cls_first=modules.interaction_classes[spec["interaction_first"]],
        num_interactions=spec["num_interactions"], num_elements=len(spec["atomic_numbers"]),
        hidden_irreps=o3.Irreps(spec["hidden_irreps"]), MLP_irreps=o3.Irreps(spec["MLP_irreps"]),
        atomic_energies=np.asarray(spec["atomic_energies"]), avg_num_neighbors=spec["avg_num_neighbors"],
        atomic_numbers=spec["atomic_numbers"], correlation=spec["correlation"], gate=torch.nn.functional.silu,
        radial_MLP=spec["radial_MLP"], use_reduced_cg=False, pair_repulsion=spec["pair_repulsion"],
        distance_transform=spec["distance_transform"], heads=spec["heads"])
    if spec["model_class"] == "ScaleShiftMACE":
        model = modules.ScaleShiftMACE(atomic_inter_scale=spec["scale"], atomic_inter_shift=spec["shift"], **kwargs)
    else:
        model = modules.MACE(**kwargs)
    tensors = read_safetensors(dump_dir / "model.safetensors")
    model.load_state_dict(_state_from_export(model, tensors), strict=True)
    for block in model.interactions:
        block.avg_num_neighbors = spec["avg_num_neighbors"]
    problems = spec_mismatches(spec, hyperparameters(model))
    if problems:
        raise ValueError("the built mace model differs from export.json: " + "; ".join(problems))
    torch.save(model, out_file)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("--environment", "--build") else "--dump"
    if mode == "--environment" and not argv:
        argv = ["-", "-"]
    if len(argv) != 2:
        print("usage: mace_dump.py MODEL.model OUT_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    here = Path(__file__).resolve().parent  # holds foundation's mace.py: keep it from shadowing mace-torch
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import mace  # noqa: F401
        import torch
    except ImportError as err:
        print(f"mace_dump: this Python ({sys.executable}) cannot import mace-torch ({err}); run the dumper with "
              "the python of a mace-torch environment (bash scripts/setup_mace_venv.sh DIR)", file=sys.stderr)
        return 3
    if mode == "--environment":
        print(json.dumps(environment()))
        return 0
    if mode == "--build":
        build_from_export(Path(argv[0]), Path(argv[1]))
        print(f"mace_dump: wrote {argv[1]}")
        return 0
    path = Path(argv[0])
    model = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(model, dict) and "model" in model:
        model = model["model"]
    if not isinstance(model, torch.nn.Module):
        print(f"mace_dump: {path} holds a {type(model).__name__}, not a mace model", file=sys.stderr)
        return 4
    dump_model(model, argv[1], {"file": path.name, "sha256": sha256_of(path)})
    print(f"mace_dump: wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
