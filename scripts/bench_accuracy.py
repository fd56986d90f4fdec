"""Accuracy at equal epochs: ours and mace-torch trained side by side (issue 4).

Systems: rMD17 ethanol and aspirin (950 train / 50 validation frames drawn, seeded, from
rmd17_<molecule>_train_01.xyz; the 1000 frames of rmd17_<molecule>_test_01.xyz for test) and mlearn Si
with stress (194 / 20 from Si_train.xyz; the 25 frames of Si_test.xyz for test). Both codes get the same
split files (written once as extxyz with REF_energy / REF_forces / REF_stress labels) and the same settings:
epochs, channels, L, correlation, max_ell, r_max, radial basis, batch size, lr (constant), Adam with AMSGrad
(mace's default), gradient clip 10, loss weights E:F(:S) = 1:100(:100) on per-atom energy and force (stress)
components, EMA 0.99, float32 (``--dtype float64``: both in float64), least-squares reference energies, threads.
What differs, by design of each
code: mace reports the epoch with the lowest validation loss (its checkpoint), ours the last step, after the
recipes' ``refit_e0`` (least-squares E0 correction to the EMA model's training-set energy residuals; forces
unchanged; foundation/train/refit.py). ``--ours-set KEY=VALUE`` changes our recipe for studies.

- ours: `foundation data convert` of the splits, then `Trainer` of recipes/bench/rmd17.yaml or
  recipes/bench/mlearn_si.yaml (+ --set overrides) in a subprocess; atom-budget batches with
  max_atoms = batch size x mean atoms per structure (exactly B molecules for rMD17), max_steps = the
  sampler's batches per epoch x epochs; validation once per epoch; then `foundation.evaluate` on the
  test file (EMA weights, the model's dtype).
- mace-torch: `mace.cli.run_train` (what `mace_run_train` runs) in its own venv through
  scripts/_mace_train_worker.py; its test table (PerAtomMAE, PerAtomMAEstressvirials for Si; 0.1 meV
  resolution) is read from its log.
Wall time per epoch: ours = (Trainer.fit() - its one final checkpoint + export) / epochs (training +
validation per epoch);
mace = log time from its initial validation to its last epoch line / epochs (training + validation + its
per-epoch checkpoint). CPU s/epoch: process CPU time of the same loops (ours: fit() minus the final
save; mace: mace.tools.train, which adds one initial validation pass), less sensitive to a loaded machine
than wall time (1 thread per side). Setup (data loading, statistics) and the final test evaluation are
excluded on both sides. The two codes run one after the other, never concurrently; the load average is recorded.

  python scripts/bench_accuracy.py --mace-python /work/mace-venv/bin/python --epochs 5 --json out.json
  python scripts/bench_accuracy.py --quick --mace-python /work/mace-venv/bin/python       (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
DEFAULT_DATA = REPO / "data"
SYSTEMS = {  # name: (train file, test file, validation frames, recipe, stress)
    "ethanol": ("rmd17/rmd17_ethanol_train_01.xyz.xz", "rmd17/rmd17_ethanol_test_01.xyz.xz", 50, "rmd17", False),
    "aspirin": ("rmd17/rmd17_aspirin_train_01.xyz.xz", "rmd17/rmd17_aspirin_test_01.xyz.xz", 50, "rmd17", False),
    "si": ("mlearn/Si_train.xyz.xz", "mlearn/Si_test.xyz.xz", 20, "mlearn_si", True),
}
TRAIN_FRAMES = {"ethanol": 950, "aspirin": 950, "si": None}   # None: all frames left after validation


# --- data ------------------------------------------------------------------------------------------------
def labelled_copy(atoms, stress: bool):
    """A copy of ``atoms`` with labels as REF_energy (eV), REF_forces (eV/Å), REF_stress (3x3 eV/Å³, ASE sign)
    in info/arrays, no calculator and no config_type (mace would split its test table by config_type)."""
    from ase import Atoms

    from foundation import keys
    from foundation.data.labels import read_labels
    labels = read_labels(atoms)
    if keys.ENERGY not in labels or keys.FORCES not in labels or (stress and keys.STRESS not in labels):
        raise ValueError(f"a structure ({atoms.get_chemical_formula()}) lacks energy/forces{'/stress' * stress}")
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info["REF_energy"] = float(labels[keys.ENERGY])
    out.arrays["REF_forces"] = np.asarray(labels[keys.FORCES], np.float64)
    if stress:
        out.info["REF_stress"] = np.asarray(labels[keys.STRESS], np.float64).reshape(3, 3)
    return out


def write_splits(system: str, data_dir: Path, out: Path, quick: bool, seed: int = 0) -> dict[str, Path]:
    """train.xyz / valid.xyz / test.xyz of ``system`` in ``out`` (seeded split of the train file)."""
    from ase.io import write

    from foundation.data.readers import read_atoms
    train_file, test_file, n_valid, _, stress = SYSTEMS[system]
    frames, test = read_atoms(data_dir / train_file), read_atoms(data_dir / test_file)
    perm = np.random.default_rng(seed).permutation(len(frames))
    n_train = TRAIN_FRAMES[system] or len(frames) - n_valid
    if quick:
        n_valid, n_train, test = max(5, n_valid // 5), min(n_train, 100), test[:100]
    if n_valid + n_train > len(frames):
        raise ValueError(f"{train_file} has {len(frames)} frames; need {n_train} train + {n_valid} validation")
    parts = {"valid": [frames[i] for i in perm[:n_valid]],
             "train": [frames[i] for i in perm[n_valid:n_valid + n_train]], "test": test}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.xyz"
        write(str(paths[name]), [labelled_copy(a, stress) for a in part], format="extxyz")
    return paths


def batches_per_epoch(natoms: np.ndarray, max_atoms: int, epochs: int, seed: int = 0) -> list[int]:
    """Number of atom-budget batches our sampler makes in each of ``epochs`` epochs (shuffled, seeded)."""
    from foundation.data.sampling import AtomBudgetBatchSampler
    sampler = AtomBudgetBatchSampler(natoms, max_atoms, shuffle=True, seed=seed, num_replicas=1, rank=0)
    counts = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.append(len(sampler))
    return counts


# --- ours -------------------------------------------------------------------------------------------------
def ours_overrides(a, system: str, lmdb: Path, run_dir: Path, max_atoms: int, steps: list[int]) -> list[str]:
    """--set overrides of the recipe for this run (data, length, size; the rest is in the recipe)."""
    per_epoch = max(1, round(sum(steps) / len(steps)))
    model = {"num_channels": a.channels, "max_L": a.L, "r_max": a.r_max, "max_ell": a.max_ell,
             "correlation": a.correlation, "num_layers": 2, "num_bessel": 8, "num_poly_cutoff": 5,
             "radial_mlp": [64, 64, 64], "readout_mlp": 16, "dtype": a.dtype}
    return [f"out_dir={run_dir}", f"max_steps={sum(steps)}", f"log_every={per_epoch}",
            f"valid_every={per_epoch}", f"checkpoint_every={sum(steps)}", f"data.train=[{lmdb / 'train'}]",
            f"data.valid=[{lmdb / 'valid'}]", f"data.max_atoms={max_atoms}", f"optim.lr={a.lr}",
            f"seed={a.seed}", "model.overrides=" + json.dumps(model),
            f"engine.precision={'fp64' if a.dtype == 'float64' else 'fp32'}"] + list(a.ours_set)


def run_ours(a, system: str, split: dict[str, Path], work: Path) -> dict:
    """Convert, train (subprocess, timed inside) and evaluate our model; returns the result row."""
    from ase.io import read

    from foundation.data.convert import convert
    lmdb = work / "ours" / "lmdb"
    for name in ("train", "valid"):
        convert([split[name]], lmdb / name, r_max=a.r_max, progress=False)
    natoms = np.array([len(x) for x in read(str(split["train"]), ":")])
    max_atoms = int(max(natoms.max(), round(a.batch_size * natoms.mean())))
    steps = batches_per_epoch(natoms, max_atoms, a.epochs, seed=a.seed)
    spec = {"recipe": str(REPO / "recipes" / "bench" / f"{SYSTEMS[system][3]}.yaml"), "threads": a.threads,
            "overrides": ours_overrides(a, system, lmdb, work / "ours" / "run", max_atoms, steps),
            "test": str(split["test"]), "result": str(work / "ours" / "result.json")}
    (work / "ours" / "spec.json").write_text(json.dumps(spec, indent=1))
    log = work / "ours" / "train.log"
    from foundation.train.engine import child_environment
    env = child_environment(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--ours-worker", str(work / "ours" / "spec.json")],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"our training for {system} failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    res = json.loads((work / "ours" / "result.json").read_text())
    m = res["metrics"]
    row = {"system": system, "code": "ours", "epochs": a.epochs, "params": res["params"],
           "s_per_epoch": (res["fit_seconds"] - res["save_seconds"]) / a.epochs, "steps": sum(steps),
           "max_atoms": max_atoms, "final_save_seconds": res["save_seconds"],
           "cpu_s_per_epoch": res["cpu_seconds"] / a.epochs,
           "e_mae_mev_atom": 1000 * m["all/energy_per_atom"]["mae"], "e_mae_mev": 1000 * m["all/energy"]["mae"],
           "f_mae_mev_A": 1000 * m["all/forces"]["mae"],
           "s_mae_mev_A3": 1000 * m["all/stress"]["mae"] if "all/stress" in m else None}
    refit = work / "ours" / "run" / "refit_e0.json"
    if refit.is_file():   # the energy offset that refit_e0 removed (training set, meV/atom)
        row["refit_e0_offset_mev_atom"] = [1000 * h["mean_residual_per_atom_before"]
                                           for h in json.loads(refit.read_text()).values()]
    return row


def ours_worker(spec_path: str) -> int:
    """Subprocess body: train per the spec (timing ``fit()``), evaluate on the test file, write the result."""
    import torch
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    from foundation.evaluate import evaluate
    from foundation.train.config import load_config
    from foundation.train.loop import Trainer
    config = load_config(spec["recipe"], spec["overrides"])

    class TimedTrainer(Trainer):
        """Trainer that also measures its checkpoint/export time (the final save, not a per-epoch cost)."""
        io_seconds, io_cpu_seconds, _depth = 0.0, 0.0, 0

        def _timed(self, fn, *args):
            self._depth += 1
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.io_seconds += time.perf_counter() - start
                    self.io_cpu_seconds += time.process_time() - cpu

        def save(self):
            return self._timed(super().save)

        def export(self, *args):
            return self._timed(super().export, *args)

    trainer = TimedTrainer(config)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit()
    fit_seconds, fit_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    params = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    metrics = evaluate(Path(config.out_dir) / "model", spec["test"], max_atoms=config.data.max_atoms)
    Path(spec["result"]).write_text(json.dumps({"params": params, "fit_seconds": fit_seconds,
                                                "save_seconds": trainer.io_seconds,
                                                "cpu_seconds": fit_cpu_seconds - trainer.io_cpu_seconds,
                                                "metrics": metrics}, indent=1))
    return 0


# --- mace-torch -------------------------------------------------------------------------------------------
def mace_arguments(a, system: str, split: dict[str, Path], work: Path) -> list[str]:
    """mace_run_train arguments with the same settings as ours."""
    stress = SYSTEMS[system][4]
    args = {"name": system, "work_dir": work, "seed": a.seed, "device": "cpu", "default_dtype": a.dtype,
            "model": "ScaleShiftMACE", "r_max": a.r_max, "num_radial_basis": 8, "num_cutoff_basis": 5,
            "max_ell": a.max_ell, "correlation": a.correlation, "num_interactions": 2,
            "num_channels": a.channels, "max_L": a.L, "MLP_irreps": "16x0e", "radial_MLP": "[64, 64, 64]",
            "train_file": split["train"], "valid_file": split["valid"], "test_file": split["test"],
            "energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress", "E0s": "average",
            "loss": "stress" if stress else "weighted", "energy_weight": 1.0, "forces_weight": 100.0,
            "stress_weight": 100.0, "error_table": "PerAtomMAEstressvirials" if stress else "PerAtomMAE",
            "batch_size": a.batch_size, "valid_batch_size": 10, "lr": a.lr, "weight_decay": 0.0,
            "optimizer": "adam", "ema_decay": 0.99, "max_num_epochs": a.epochs, "eval_interval": 1,
            "patience": 100000, "clip_grad": 10.0, "num_workers": 0}
    out = [f"--{k}={v}" for k, v in args.items()] + ["--ema"]
    return out + (["--compute_stress=True"] if stress else [])


def run_mace(a, system: str, split: dict[str, Path], work: Path) -> dict:
    """Train with mace_run_train in the mace venv; the result row from its log."""
    from ase.io import read
    mace_dir = work / "mace"
    mace_dir.mkdir(parents=True, exist_ok=True)
    train = read(str(split["train"]), ":")
    hyper = {"r_max": a.r_max, "num_bessel": 8, "num_poly_cutoff": 5, "max_ell": a.max_ell, "num_layers": 2,
             "num_channels": a.channels, "max_L": a.L, "correlation": a.correlation,
             "radial_mlp": [64, 64, 64], "readout_mlp": 16}
    zs = sorted({int(z) for atoms in train for z in atoms.numbers})
    (mace_dir / "hyper.json").write_text(json.dumps({"hyper": hyper, "atomic_numbers": zs, "threads": a.threads}))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    env.pop("PYTHONPATH", None)  # the mace venv must not see our package
    cmd = [a.mace_python, str(SCRIPTS / "_mace_train_worker.py"), "--hyper", str(mace_dir / "hyper.json"),
           "--result", str(mace_dir / "result.json"), "--"] + mace_arguments(a, system, split, mace_dir)
    log = mace_dir / "stdout.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(mace_dir))
    if proc.returncode != 0:
        raise RuntimeError(f"mace-torch training for {system} failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    res = json.loads((mace_dir / "result.json").read_text())
    logs = sorted((mace_dir / "logs").glob("*.log"))
    if not logs:
        raise FileNotFoundError(f"no mace log under {mace_dir / 'logs'}; see {log}")
    text = logs[-1].read_text()
    seconds = mace_epoch_seconds(text, a.epochs)
    test = mace_test_errors(text)
    natoms = {len(x) for x in read(str(split["test"]), ":")}
    per_molecule = test["e_mae_mev_atom"] * natoms.pop() if len(natoms) == 1 else None
    return {"system": system, "code": "mace-torch", "epochs": a.epochs, "params": res["params"],
            "s_per_epoch": seconds, "cpu_s_per_epoch": res["loop_cpu_seconds"] / a.epochs,
            "e_mae_mev": per_molecule, **test, "versions": res["versions"]}


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: "


def mace_epoch_seconds(log: str, epochs: int) -> float:
    """Seconds per epoch from a mace_run_train log: time from the 'Initial' validation line to the line of the
    last epoch, over ``epochs`` (each epoch = training + validation + checkpoint)."""
    def stamp(pattern: str) -> datetime:
        hits = re.findall(_STAMP + pattern, log, flags=re.M)
        if not hits:
            raise ValueError(f"mace log has no line matching {pattern!r}; did the run finish?")
        return datetime.strptime(hits[-1] if isinstance(hits[-1], str) else hits[-1][0], "%Y-%m-%d %H:%M:%S.%f")
    start, end = stamp(r"Initial: "), stamp(rf"Epoch {epochs - 1}: ")
    return (end - start).total_seconds() / epochs


def mace_test_errors(log: str) -> dict:
    """Test MAE from the 'Error-table on TEST' of a mace_run_train log (one row: no config_type in the file).
    Returns e_mae_mev_atom, f_mae_mev_A and s_mae_mev_A3 (None without a stress column)."""
    if "Error-table on TEST:" not in log:
        raise ValueError("mace log has no 'Error-table on TEST'; was --test_file given and did the run finish?")
    rows = []
    for line in log.split("Error-table on TEST:", 1)[1].splitlines()[1:]:
        if not line.startswith(("+", "|")):
            break  # end of the table
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    if len(rows) != 2:
        raise ValueError(f"expected a header and one row in mace's test table, got {len(rows) - 1} rows")
    row = dict(zip(rows[0], rows[1]))
    stress = [k for k in row if k.startswith("MAE Stress")]
    return {"e_mae_mev_atom": float(row["MAE E / meV / atom"]), "f_mae_mev_A": float(row["MAE F / meV / A"]),
            "s_mae_mev_A3": float(row[stress[0]]) if stress else None}


# --- driver -----------------------------------------------------------------------------------------------
def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def format_table(rows: list[dict]) -> str:
    """The result table (E MAE in meV/atom and meV per structure, F in meV/Å, S in meV/Å³)."""
    def f(x, fmt):
        return f"{'-':>{fmt.split('.')[0]}s}" if x is None else format(x, fmt)
    head = (f"{'system':8s} {'code':10s} {'epochs':>6s} {'params':>8s} {'s/epoch':>8s} {'cpu s/ep':>8s} "
            f"{'E meV/at':>9s} {'E meV':>8s} {'F meV/Å':>8s} {'S meV/Å³':>9s} {'load':>5s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['system']:8s} {r['code']:10s} {r['epochs']:6d} {r['params']:8d} {r['s_per_epoch']:8.1f} "
                     f"{f(r.get('cpu_s_per_epoch'), '8.1f')} "
                     f"{f(r['e_mae_mev_atom'], '9.2f')} {f(r['e_mae_mev'], '8.1f')} {f(r['f_mae_mev_A'], '8.1f')} "
                     f"{f(r['s_mae_mev_A3'], '9.2f')} {r['load'].split()[0]:>5s}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default="ethanol,aspirin,si", help="comma list of ethanol, aspirin, si")
    p.add_argument("--codes", default="ours,mace", help="comma list of ours, mace (default both)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--L", type=int, default=0, help="hidden feature order max_L (0, 1, 2)")
    p.add_argument("--max-ell", type=int, default=3)
    p.add_argument("--correlation", type=int, default=3)
    p.add_argument("--r-max", type=float, default=5.0, help="cutoff, Å")
    p.add_argument("--batch-size", type=int, default=5, help="structures per batch (ours: atom budget equivalent)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="model and training precision of both codes (ours: model dtype + engine.precision fp32/fp64; "
                        "mace: --default_dtype)")
    p.add_argument("--mace-python", default="/work/mace-venv/bin/python", help="python of the mace-torch venv")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with rmd17/ and mlearn/")
    p.add_argument("--out", default="runs/bench_accuracy", help="work folder (splits, runs, logs)")
    p.add_argument("--json", default=None, help="write settings and result rows here")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed of both codes (initial weights, batch order); the data splits stay fixed")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set override of our recipe, after the script's own (repeatable; for studies)")
    p.add_argument("--quick", action="store_true", help="smoke test: ethanol, 1 epoch, 100 train frames, 8 ch")
    p.add_argument("--ours-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.systems, a.epochs, a.channels = "ethanol", 1, 8
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.ours_worker:
        return ours_worker(a.ours_worker)
    data = Path(a.data).resolve()
    if not data.is_dir():
        print(f"bench_accuracy: data folder {data} not found; nothing to do (pass --data DIR)")
        return 0
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    codes = [c.strip() for c in a.codes.split(",") if c.strip()]
    bad = [s for s in systems if s not in SYSTEMS] + [c for c in codes if c not in ("ours", "mace")]
    if bad:
        raise ValueError(f"unknown --systems/--codes entries {bad}; systems: {sorted(SYSTEMS)}, codes: ours, mace")
    if "mace" in codes and not Path(a.mace_python).is_file():
        raise FileNotFoundError(f"--mace-python {a.mace_python} does not exist; create the venv with "
                                "`bash scripts/setup_mace_venv.sh [DIR]` or pass --codes ours")
    out, rows = Path(a.out).resolve(), []
    settings = {k: v for k, v in vars(a).items() if k != "ours_worker"}
    for system in systems:
        work = out / system
        split = write_splits(system, data, work / "split", a.quick)
        for code in codes:
            before = load()
            t0 = time.perf_counter()
            row = (run_ours if code == "ours" else run_mace)(a, system, split, work)
            row.update(load=before, total_seconds=time.perf_counter() - t0, load_after=load())
            rows.append(row)
            print(format_table([row]).splitlines()[1], flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("\n" + format_table(rows))
    print(f"settings: {json.dumps(settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
