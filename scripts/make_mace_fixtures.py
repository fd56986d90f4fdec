"""Write the mace-torch import fixtures: small random-weight models of every mace family, dumped, with mace's
own reference energies, forces and stresses. Runs in the mace-torch venv (never imports ``foundation``):

    bash scripts/setup_mace_venv.sh /work/mace-venv
    /work/mace-venv/bin/python scripts/make_mace_fixtures.py [--out tests/interop/fixtures] [--families a,b]

Each family is built with its published hyperparameters (ACEsuit/mace-mp, mace-foundations, mace-off training
scripts: model class, interaction blocks, radial basis, cutoff, distance transform, pair repulsion, max_ell,
correlation, hidden L, readout MLP, dtype) but 4 channels, a [16, 16, 16] radial MLP and 5 elements (H, C, O,
Cu, Au), so every component is present and the files stay small. Weights are random (torch seed), E0, scale
and shift are set to non-trivial values. For each family OUT/<family>/ gets the dumper's model.safetensors +
hyper.json (``foundation/interop/mace_dump.py``, loaded by path) and reference.json: per structure (a triclinic
4-element periodic cell, a Cu-Au cell, a molecule) mace's ``MACECalculator`` energy (eV), forces (eV/Å) and
stress (eV/Å³, 3x3), and the same three as one mixed batch through the mace model itself.

``--evaluate JOBS.json`` evaluates saved .model files (e.g. exported ones) on the structures of a reference.json.
``--model-file small.model --name trained`` makes the fixture of an existing model instead (the one in
tests/interop/fixtures/trained was trained here by ``mace_run_train --model MACE --num_channels 8 --max_L 1
--r_max 4.5 --num_radial_basis 8 --max_num_epochs 3`` on 34 EMT Cu-Au cells, docs/interop.md); structures
use the model's own elements in place of the ones it lacks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZS = [1, 6, 8, 29, 79]
COMMON = dict(max_ell=3, correlation=3, MLP_irreps="16x0e", radial_MLP=[16, 16, 16], channels=4)
FAMILIES = {
    # MACE-MP-0 (mace_mp_0/*.sh): ScaleShiftMACE, residual blocks, 10 Bessel, r_max 6, float64 training
    "mp0": dict(COMMON, model="ScaleShiftMACE", first="RealAgnosticResidualInteractionBlock",
                inter="RealAgnosticResidualInteractionBlock", r_max=6.0, num_bessel=10, max_L=1, dtype="float64"),
    # the same in float32 (mace_mp's default calculator dtype)
    "mp0_float32": dict(COMMON, model="ScaleShiftMACE", first="RealAgnosticResidualInteractionBlock",
                        inter="RealAgnosticResidualInteractionBlock", r_max=6.0, num_bessel=10, max_L=1,
                        dtype="float32"),
    # MACE-OFF23 (mace_off23/train_scripts): --model MACE (non-residual first block, shift 0), r_max 5,
    # 8 Bessel, float64; large has L = 2
    "off23": dict(COMMON, model="MACE", first="RealAgnosticInteractionBlock",
                  inter="RealAgnosticResidualInteractionBlock", r_max=5.0, num_bessel=8, max_L=2, dtype="float64"),
    # MACE-MP-0b3 and MACE-OMAT-0 (mace_mp_0b3/mace-mp0-b3.sh, mace_omat/mace-omat-medium.sh): --model MACE,
    # density blocks, ZBL pair repulsion, Agnesi transform, float64
    "mp0b3": dict(COMMON, model="MACE", first="RealAgnosticDensityInteractionBlock",
                  inter="RealAgnosticDensityResidualInteractionBlock", r_max=6.0, num_bessel=10, max_L=1,
                  dtype="float64", pair_repulsion=True, distance_transform="Agnesi"),
    # MACE-MPA-0: the 0b3 architecture with two heads (fine-tuning with replay)
    "mpa0": dict(COMMON, model="MACE", first="RealAgnosticDensityInteractionBlock",
                 inter="RealAgnosticDensityResidualInteractionBlock", r_max=6.0, num_bessel=10, max_L=1,
                 dtype="float64", pair_repulsion=True, distance_transform="Agnesi", heads=["default", "pt_head"]),
}


def load_dumper():
    spec = importlib.util.spec_from_file_location("mace_dump", ROOT / "foundation" / "interop" / "mace_dump.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(fam: dict, seed: int):
    """A random-weight mace model of the family (as mace_run_train builds it: --model MACE is ScaleShiftMACE
    with shift 0 and a non-residual first block)."""
    from e3nn import o3
    from mace import modules
    torch.manual_seed(seed)
    heads = fam.get("heads", ["Default"])
    c, n = fam["channels"], len(ZS)
    hidden = "+".join(f"{c}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(fam["max_L"] + 1))
    rng = np.random.default_rng(seed)
    e0 = rng.normal(-3.0, 1.0, size=(len(heads), n)) if len(heads) > 1 else rng.normal(-3.0, 1.0, size=n)
    scale = [float(x) for x in rng.uniform(0.5, 2.0, size=len(heads))]
    shift = [0.0] * len(heads) if fam["model"] == "MACE" else [float(x) for x in rng.normal(0, 0.3, len(heads))]
    return modules.ScaleShiftMACE(
        r_max=fam["r_max"], num_bessel=fam["num_bessel"], num_polynomial_cutoff=5, max_ell=fam["max_ell"],
        interaction_cls=modules.interaction_classes[fam["inter"]],
        interaction_cls_first=modules.interaction_classes[fam["first"]], num_interactions=2, num_elements=n,
        hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps(fam["MLP_irreps"]), atomic_energies=e0,
        avg_num_neighbors=float(rng.uniform(8, 20)), atomic_numbers=ZS, correlation=fam["correlation"],
        gate=torch.nn.functional.silu, radial_MLP=fam["radial_MLP"], use_reduced_cg=False,
        pair_repulsion=fam.get("pair_repulsion", False), distance_transform=fam.get("distance_transform", "None"),
        atomic_inter_scale=scale, atomic_inter_shift=shift, heads=heads)


def structures():
    """(triclinic Cu-Au-O-C periodic cell, Cu3Au cell, a molecule) as ASE Atoms, fixed seed."""
    from ase import Atoms
    from ase.build import molecule
    rng = np.random.default_rng(7)
    cell = np.array([[4.6, 0.0, 0.0], [1.1, 4.3, 0.0], [0.7, -0.9, 4.9]])
    frac, numbers = [], [29, 79, 8, 6, 29, 8, 79, 1]
    while len(frac) < len(numbers):
        f = rng.uniform(0, 1, 3)
        trial = Atoms(numbers=numbers[:len(frac) + 1], scaled_positions=[*frac, f], cell=cell, pbc=True)
        if len(frac) == 0 or trial.get_distances(len(frac), list(range(len(frac))), mic=True).min() > 1.6:
            frac.append(f)
    tri = Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
    cuau = Atoms("Cu3Au", scaled_positions=[[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0, 0]],
                 cell=np.eye(3) * 3.75, pbc=True).repeat((2, 1, 1))
    cuau.positions += rng.normal(0, 0.08, cuau.positions.shape)
    cuau.set_cell(cuau.cell.array @ (np.eye(3) + rng.normal(0, 0.01, (3, 3))), scale_atoms=True)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(0, 0.05, mol.positions.shape)
    return {"triclinic": tri, "cuau": cuau, "molecule": mol}


def adapted(frames: dict, zs: list[int]) -> dict:
    """The structures with elements the model lacks replaced by its own (cyclically); a molecule that changes
    elements is stretched x2.2 so that metal atoms do not sit at C-H distances."""
    out = {}
    for name, atoms in frames.items():
        atoms = atoms.copy()
        missing = sorted({int(z) for z in atoms.numbers} - set(zs))
        if missing:
            sub = {z: zs[k % len(zs)] for k, z in enumerate(missing)}
            atoms.numbers = [sub.get(int(z), int(z)) for z in atoms.numbers]
            if not atoms.pbc.any():
                atoms.positions *= 2.2
        out[name] = atoms
    return out


def references(path: Path, model, dtype: str, head: str | None, frames: dict | None = None) -> dict:
    """MACECalculator per structure and the mixed batch through the model; ``frames``: the structures (default:
    ``structures()`` adapted to the model's elements)."""
    from mace import data as mace_data
    from mace.calculators import MACECalculator
    from mace.tools import AtomicNumberTable, torch_geometric
    kwargs = {"head": head} if head else {}
    calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype=dtype, **kwargs)
    out = {"structures": {}}
    zs = [int(z) for z in model.atomic_numbers.tolist()]
    frames = frames or adapted(structures(), zs)
    for name, atoms in frames.items():
        atoms = atoms.copy()
        atoms.calc = calc
        stress = atoms.get_stress(voigt=False) if atoms.pbc.any() else np.zeros((3, 3))
        out["structures"][name] = {
            "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
            "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist(),
            "energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist(),
            "stress": np.asarray(stress).tolist()}
    heads = list(model.heads)
    table = AtomicNumberTable(zs)
    graphs = []
    for atoms in frames.values():
        config = mace_data.config_from_atoms(atoms, head_name=head or heads[0])
        graphs.append(mace_data.AtomicData.from_config(config, z_table=table, cutoff=float(model.r_max), heads=heads))
    batch = torch_geometric.Batch.from_data_list(graphs).to_dict()
    result = calc.models[0](batch, compute_stress=True, training=False)
    out["batch"] = {"order": list(frames), "energy": result["energy"].tolist(), "forces": result["forces"].tolist(),
                    "stress": result["stress"].tolist()}
    out["dtype"], out["head"] = dtype, head
    return out


def make(name: str, fam: dict, out_root: Path, dumper) -> None:
    torch.set_default_dtype(torch.float64 if fam["dtype"] == "float64" else torch.float32)
    model = build(fam, seed=zlib.crc32(name.encode()) % 1000)
    out = out_root / name
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.model"
        torch.save(model, path)
        loaded = torch.load(path, weights_only=False)
        dumper.dump_model(loaded, out, {"file": path.name, "sha256": dumper.sha256_of(path)})
        head = fam.get("heads", [None])[-1]  # multi-head: the non-default head, to test head selection
        ref = references(path, loaded, fam["dtype"], head)
    ref["family"] = name
    (out / "reference.json").write_text(json.dumps(ref) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {out} ({size / 1024:.0f} kB)")


def from_file(path: Path, name: str, out_root: Path, dumper) -> None:
    """Fixture of an existing .model file (e.g. one trained here with mace_run_train), float64 references."""
    torch.set_default_dtype(torch.float64)
    model = torch.load(path, weights_only=False, map_location="cpu")
    out = out_root / name
    dumper.dump_model(model, out, {"file": path.name, "sha256": dumper.sha256_of(path)})
    ref = references(path, model, "float64", None)
    ref["family"] = name
    (out / "reference.json").write_text(json.dumps(ref) + "\n")
    print(f"{name}: {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1024:.0f} kB)")


def evaluate(jobs_file: Path) -> None:
    """Each job of JOBS.json ({"model": .model file, "out": JSON, "dtype", "heads": [...], "structures": a
    reference.json whose structures to use}) -> out: {str(head): references} of that saved model (one process for all:
    ``scripts/bench_mace_roundtrip.py`` evaluates the exported models with it)."""
    from ase import Atoms
    for job in json.loads(jobs_file.read_text()):
        torch.set_default_dtype(torch.float64 if job["dtype"] == "float64" else torch.float32)
        model = torch.load(job["model"], weights_only=False, map_location="cpu")
        given = json.loads(Path(job["structures"]).read_text())["structures"]
        frames = {n: Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
                  for n, s in given.items()}
        out = {str(h): references(Path(job["model"]), model, job["dtype"], h, frames) for h in job["heads"]}
        Path(job["out"]).write_text(json.dumps(out) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "interop" / "fixtures"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--model-file", default=None, help="dump this .model file instead (fixture --name)")
    parser.add_argument("--name", default="trained", help="fixture name for --model-file")
    parser.add_argument("--evaluate", default=None, metavar="JOBS.json",
                        help="evaluate saved .model files on given structures instead (see evaluate())")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.evaluate:
        evaluate(Path(args.evaluate))
        return 0
    dumper = load_dumper()
    if args.model_file:
        from_file(Path(args.model_file), args.name, Path(args.out), dumper)
        return 0
    for name in args.families.split(","):
        make(name, FAMILIES[name], Path(args.out), dumper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
