"""Live mace -> foundation -> mace round trip, every family, and a fine-tuned imported model exported to mace.

    PYTHONPATH=. .venv/bin/python scripts/bench_mace_roundtrip.py --mace-python /work/mace-venv/bin/python

1. ``scripts/make_mace_fixtures.py`` in the mace venv builds fresh random-weight mace-torch models of every family
   (each family's published hyperparameters, 4 channels) and records mace's ``MACECalculator`` energy, forces and
   stress on a triclinic 4-element cell, a Cu-Au cell, a molecule, and the three as one mixed batch. The
   checked-in ``trained`` fixture (a ``mace_run_train`` model, references recorded from its original ``.model``)
   is added. ``--fixtures DIR`` uses existing dumps instead (e.g. tests/interop/fixtures).
2. ``foundation import mace DUMP`` then ``foundation export mace`` (its last step in the mace venv) -> back.model.
3. ``make_mace_fixtures.py --evaluate`` runs ``MACECalculator`` on every back.model, same structures and batch,
   for every head of a multi-head model (mace's references are for one head, ``pt_head`` for MPA-0; on the other
   heads the exported model is compared with our imported one).
4. A fine-tune: ``foundation finetune recipes/finetune_imported_mace.yaml`` from the imported ``trained`` model
   (new head ``cuau``, full strategy, ``--finetune-steps`` steps on EMT-labelled Cu-Au cells), exported; mace's
   outputs of the export for both heads against our ``FoundationCalculator`` on the fine-tuned model.

Prints family | dtype | max |exported - original| of energy (eV), forces (eV/Å), stress (eV/Å³) | within the
issue's tolerance (1e-8 x max(1, max |reference|) in float64, 1e-5 in float32). Exit status 1 if a row fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TRAINED = ROOT / "tests" / "interop" / "fixtures" / "trained"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mace-python", required=True, help="python of a mace-torch venv (scripts/setup_mace_venv.sh)")
    parser.add_argument("--fixtures", default=None, help="round-trip these dumps instead of fresh random models")
    parser.add_argument("--finetune-steps", type=int, default=4, help="steps of the fine-tune (0: skip it)")
    parser.add_argument("--keep", default=None, help="keep the work folder here (imports, exports, evaluations)")
    return parser.parse_args(argv)


def mace_env() -> dict:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def run_mace(mace_python: str, *args: str) -> None:
    """scripts/make_mace_fixtures.py ARGS in the mace venv (its warnings hidden unless it fails)."""
    proc = subprocess.run([mace_python, str(ROOT / "scripts" / "make_mace_fixtures.py"), *args], env=mace_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"make_mace_fixtures.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def cli(*argv: str) -> None:
    """``foundation ARGV`` in this process (the console script's entry point)."""
    from foundation.cli import main
    if main(list(argv)) != 0:
        raise SystemExit(f"foundation {' '.join(argv)} failed")


def dumps(args, work: Path) -> list[Path]:
    """The dumps to round-trip: fresh families (or --fixtures) plus the trained fixture."""
    if args.fixtures:
        found = sorted(p for p in Path(args.fixtures).iterdir() if (p / "reference.json").is_file())
    else:
        run_mace(args.mace_python, "--out", str(work / "fresh"))
        found = sorted(p for p in (work / "fresh").iterdir() if (p / "reference.json").is_file())
    return found + ([TRAINED] if TRAINED not in found and TRAINED.name not in {p.name for p in found} else [])


def emt_cells(path: Path, count: int = 10) -> Path:
    """``count`` rattled, strained Cu-Au fcc cells (8 atoms) with EMT energy, forces and stress, as extxyz."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write
    rng, frames = np.random.default_rng(0), []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
        atoms.numbers[rng.choice(len(atoms), size=int(rng.integers(1, 5)), replace=False)] = 79
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return path


def finetune(imported: Path, work: Path, steps: int) -> Path:
    """``foundation finetune`` (subprocess, as the CLI runs it) from ``imported``: new head cuau; returns model/."""
    data = emt_cells(work / "cuau_emt.extxyz")
    out = work / "finetuned"
    sets = [f"base.model={imported}", f"out_dir={out}", f"data.train=[{data}]", f"max_steps={steps}",
            f"valid_every={steps}", f"checkpoint_every={steps}", "log_every=1", "progress=false",
            "schedule.warmup_steps=1"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "foundation.cli", "finetune", str(ROOT / "recipes" / "finetune_imported_mace.yaml")]
    proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], env=env, capture_output=True, text=True,
                          cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"foundation finetune failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return out / "model"


def moved(imported: Path, tuned) -> float:
    """max |w_tuned - w_imported| over the weights both models have (the shared backbone)."""
    from foundation.model.backbone import FoundationModel
    before = FoundationModel.from_pretrained(imported).state_dict()
    after = tuned.state_dict()
    return max(float((after[k] - v).abs().max()) for k, v in before.items()
               if k in after and after[k].shape == v.shape and v.is_floating_point())


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_mace_import import max_deviations, predict, row, within

    from foundation.model.backbone import FoundationModel
    tmp = None if args.keep else tempfile.mkdtemp(prefix="mace-roundtrip-")
    work = Path(args.keep or tmp)
    work.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    try:
        for dump in dumps(args, work):
            ref = json.loads((dump / "reference.json").read_text())
            cli("import", "mace", str(dump), "--out", str(work / "imported" / dump.name), "--license", "mit")
            back = work / "back" / f"{dump.name}.model"
            back.parent.mkdir(exist_ok=True)
            cli("export", "mace", str(work / "imported" / dump.name), "--out", str(back),
                "--mace-python", args.mace_python)
            # a multi-head model: every head; the one mace's references were made for is compared with them, the
            # others with our imported model
            imported = FoundationModel.from_pretrained(work / "imported" / dump.name)
            heads = [ref["head"]] if ref["head"] is None else list(imported.config.heads)
            jobs.append({"model": str(back), "out": str(work / "back" / f"{dump.name}.json"), "dtype": ref["dtype"],
                         "heads": heads, "structures": str(dump / "reference.json")})
            rows.append((dump.name, ref, imported))
        if args.finetune_steps:
            tuned = finetune(work / "imported" / TRAINED.name, work, args.finetune_steps)
            back = work / "back" / "finetuned.model"
            cli("export", "mace", str(tuned), "--out", str(back), "--mace-python", args.mace_python)
            model = FoundationModel.from_pretrained(tuned)
            shift = moved(work / "imported" / TRAINED.name, model)
            print(f"the fine-tune moved the backbone's weights by up to {shift:.1e}")
            jobs.append({"model": str(back), "out": str(work / "back" / "finetuned.json"), "dtype": "float64",
                         "heads": list(model.config.heads), "structures": str(TRAINED / "reference.json")})
            rows.append(("finetuned", {**json.loads((TRAINED / "reference.json").read_text()), "head": "-"}, model))
        (work / "jobs.json").write_text(json.dumps(jobs))
        run_mace(args.mace_python, "--evaluate", str(work / "jobs.json"))
        print("| model (head) | dtype | max dev. energy (eV) | forces (eV/Å) | stress (eV/Å³) | within tolerance |")
        print("|---|---|---|---|---|---|")
        ok = True
        for (name, ref, model), job in zip(rows, jobs):
            exported = json.loads(Path(job["out"]).read_text())
            for head in job["heads"]:
                # the original mace model's references, or our calculator (other heads, the fine-tuned model)
                expected = ref if head == ref["head"] else predict(model, ref, head, job["dtype"])
                dev = max_deviations(expected, exported[str(head)])
                ok &= within(dev, job["dtype"])
                print(row(f"{name} ({head})" if head else name, job["dtype"], dev))
        return 0 if ok else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
