"""Does pretraining pay off? Fine-tuned-from-pretrained vs from-scratch at 10, 50 and 200 frames (issue 8).

Pretraining: one multi-head model, a readout head per level of theory - ``pbe_vasp`` on the mlearn Si, Ge and Mo
train files (VASP PBE, periodic, with stress) and ``pbe_def2svp`` on eight rMD17 molecules (PBE/def2-SVP; every
``--every``-th frame of each train file: the frames are a time series). The two sources are different levels
of theory with unrelated total-energy zeros, so they must not share a readout (and its E0s); the three mlearn
elements share one (same code, functional and settings). Paracetamol and azobenzene are held out.

Targets, each at ``--sizes`` training frames (nested subsets):
- paracetamol (C8H9NO2, rMD17): frames evenly spaced over rmd17_paracetamol_train_01.xyz (every 100th, 20th,
  5th); validation = the 50 train-file frames with index 2 mod 20 (disjoint); test = the 1000-frame test file;
- Li (mlearn): a seeded permutation of Li_train.xyz (20 validation frames, then the training subsets); test =
  Li_test.xyz. Li is an element pretraining never saw: fine-tuning adds it (``finetune.add_elements``).
Arms, same architecture, steps, batch size, optimizer, learning-rate schedule, loss weights and EMA:
- fine-tuned: ``foundation.finetune.run`` from the pretrained model, strategy full, a new head copied from the
  base head of the same level of theory (paracetamol <- pbe_def2svp, Li <- pbe_vasp), E0 refitted by least
  squares on the residuals of the base;
- scratch: ``foundation.train.loop.Trainer`` with the same ``ModelConfig`` hyperparameters, statistics (E0,
  scale, shift, neighbour count) from the target's training frames;
- rescaled (a diagnostic, only with ``--arms``): fine-tuned, but the new head's scale and shift are fitted on
  the target's training frames (E0 refitted after), as scratch does.
Every run: validation every steps/20 (EMA weights; the learning curves), then ``foundation.evaluate`` of the
exported model on the test file. CPU seconds are the process's CPU time of each run (1 thread). Each stage writes
``result.json`` in its run directory and is skipped when re-run with the same settings.

  OMP_NUM_THREADS=1 python scripts/study_pretraining.py --out runs/study_pretraining --json study.json
  python scripts/study_pretraining.py --quick --out /tmp/pre_quick     (smoke test, < 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the data helpers beside this file
from _pretraining_data import prepare_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data"
TARGETS = {"paracetamol": "pbe_def2svp", "li": "pbe_vasp"}      # target: base head it is fine-tuned from
ARMS = ("finetuned", "scratch", "rescaled")   # rescaled: fine-tuned, new head's scale/shift fitted on the target


# --- run settings -----------------------------------------------------------------------------------------------
def model_overrides(a) -> dict:
    """The architecture of every model of the study (``ModelConfig.preset('small', **this)``)."""
    return {"num_channels": a.channels, "max_L": a.L, "r_max": a.r_max, "max_ell": 3, "correlation": 3,
            "num_layers": 2, "num_bessel": 8, "num_poly_cutoff": 5, "radial_mlp": [64, 64, 64],
            "readout_mlp": 16, "dtype": "float32"}


def train_section(a, out_dir: Path, steps: int, max_atoms: int, stress: bool) -> dict:
    """The TrainConfig keys shared by every run (data paths added by the caller)."""
    coefficients = {"energy": 1.0, "forces": 100.0, **({"stress": 100.0} if stress else {})}
    return {"out_dir": str(out_dir), "seed": a.seed, "max_steps": steps, "log_every": max(1, steps // 20),
            "valid_every": max(1, steps // 20), "checkpoint_every": steps, "keep_checkpoints": 1,
            "progress": False, "data": {"max_atoms": max_atoms},
            "optim": {"name": "adam", "lr": a.lr, "weight_decay": 0.0, "grad_clip": 10.0},
            "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.02},
            "loss": {"coefficients": coefficients}, "engine": {"zero_stage": 0, "precision": "fp32"},
            "ema": {"enabled": True, "decay": 0.99}}


def pretrain_values(a, paths: dict, out_dir: Path) -> dict:
    values = train_section(a, out_dir, a.pretrain_steps, a.max_atoms_pretrain, stress=True)
    values["optim"]["lr"] = a.pretrain_lr
    values["data"].update(train=list(paths), heads=list(paths.values()), valid_fraction=0.05)
    values["model"] = {"preset": "small", "overrides": model_overrides(a)}
    return values


def target_values(a, target: str, n: int, arm: str, data: dict, out_dir: Path, base: Path) -> dict:
    """Recipe dict of one fine-tuned (FinetuneConfig) or scratch (TrainConfig) run."""
    max_atoms = a.max_atoms_molecule if target == "paracetamol" else a.max_atoms_li
    values = train_section(a, out_dir, a.steps, max_atoms, stress=target == "li")
    values["data"].update(train=[data[target]["train"][n]], valid=[data[target]["valid"]])
    if arm == "scratch":
        values["data"]["heads"] = [target]
        values["model"] = {"preset": "small", "overrides": model_overrides(a)}
    else:
        values["base"] = {"model": str(base), "head": TARGETS[target]}
        values["finetune"] = {"strategy": "full", "head": target, "head_init": "copy", "e0": "residual",
                              "add_elements": True}
    return values


# --- runs -------------------------------------------------------------------------------------------------------
def cached(out_dir: Path, values: dict):
    """The stored result of a finished run with the same recipe, else None."""
    path = out_dir / "result.json"
    if path.is_file():
        res = json.loads(path.read_text())
        if res.get("recipe") == json.loads(json.dumps(values)):
            return res
    return None


def run_pretrain(a, paths: dict, work: Path) -> dict:
    from foundation.train.config import config_from_dict
    from foundation.train.loop import Trainer
    out_dir = work / "runs" / "pretrain"
    values = pretrain_values(a, paths, out_dir)
    res = cached(out_dir, values)
    if res is None:
        cpu, wall = time.process_time(), time.perf_counter()
        trainer = Trainer(config_from_dict(json.loads(json.dumps(values))))
        metrics = trainer.fit()
        res = {"recipe": values, "metrics": metrics, "cpu_seconds": time.process_time() - cpu,
               "wall_seconds": time.perf_counter() - wall, "load": load(),
               "params": sum(p.numel() for p in trainer.engine.module.parameters())}
        (out_dir / "result.json").write_text(json.dumps(res, indent=1))
    print(f"pretraining: {res['cpu_seconds']:.0f} CPU s, {res['params']} parameters", flush=True)
    return res


def run_target(a, target: str, n: int, arm: str, data: dict, work: Path) -> dict:
    """Train one arm on ``n`` frames of ``target``, evaluate on its test set; the result row."""
    from foundation.evaluate import evaluate
    out_dir = work / "runs" / f"{target}-{n}-{arm}"
    values = target_values(a, target, n, arm, data, out_dir, work / "runs" / "pretrain" / "model")
    res = cached(out_dir, values)
    if res is None:
        cpu, wall = time.process_time(), time.perf_counter()
        step0 = None
        if arm == "scratch":
            from foundation.train.config import config_from_dict
            from foundation.train.loop import Trainer
            trainer = Trainer(config_from_dict(json.loads(json.dumps(values))))
            trainer.fit()
            params = sum(p.numel() for p in trainer.engine.module.parameters())
        else:
            from foundation.finetune.config import finetune_config_from_dict
            from foundation.finetune.run import finetune
            config = finetune_config_from_dict(json.loads(json.dumps(values)))
            out = finetune(config) if arm == "finetuned" else finetune_rescaled(config, target)
            params, step0 = sum(p.numel() for p in out["model"].parameters()), out["zero_shot"]["refit_e0"]
        train_cpu = time.process_time() - cpu
        test = evaluate(out_dir / "model", data[target]["test"], max_atoms=values["data"]["max_atoms"])
        res = {"recipe": values, "test": test, "zero_shot_valid": step0, "curve": curve(out_dir / "valid.csv"),
               "cpu_seconds": train_cpu, "eval_cpu_seconds": time.process_time() - cpu - train_cpu,
               "wall_seconds": time.perf_counter() - wall, "params": params, "load": load()}
        (out_dir / "result.json").write_text(json.dumps(res, indent=1))
    t = res["test"]
    row = {"target": target, "frames": n, "arm": arm, "params": res["params"], "cpu_seconds": res["cpu_seconds"],
           "e_mae_mev_atom": 1000 * t["all/energy_per_atom"]["mae"], "e_mae_mev": 1000 * t["all/energy"]["mae"],
           "f_mae_mev_A": 1000 * t["all/forces"]["mae"],
           "s_mae_mev_A3": 1000 * t["all/stress"]["mae"] if "all/stress" in t else None,
           "curve": res["curve"], "zero_shot_valid": res["zero_shot_valid"], "load": res["load"]}
    print(format_rows([row]).splitlines()[1], flush=True)
    return row


def finetune_rescaled(config, target: str) -> dict:
    """The ``finetuned`` arm with one change (a diagnostic): before training, the new head's scale (force RMS,
    eV/Å) and shift (eV/atom) are those of the target's training frames instead of the base head's, and E0 is
    refitted on the residuals of that rescaled model. The library's step-0 guarantee does not hold for this arm."""
    from foundation.evaluate import predict
    from foundation.finetune import run as ft
    from foundation.train.data import open_datasets, statistics
    prepared = ft.finetune(config, train=False)    # rewrites config.data (converted paths, heads) in place
    model, t = prepared["model"], config
    r_max = float(model.config.r_max)
    train_sets, _ = open_datasets(t, r_max)
    for ds in train_sets:
        getattr(ds, "dataset", ds).dtype = model.dtype
    stats = statistics(train_sets, r_max)
    model.set_statistics(scale=stats["scale"], shift=stats["shift"], head=target)
    fit = predict(model, train_sets, prepared["heads"], t.data.max_atoms)
    e0 = ft.refit_e0(model.config, target, fit.numbers, fit.labels, fit.preds, "residual")
    model.set_statistics(atomic_energies=e0, head=target)
    print(f"rescaled head {target!r}: scale {stats['scale']:.4g} eV/Å, shift {stats['shift']:.4g} eV/atom, "
          f"E0 {e0}", flush=True)
    from foundation.train.loop import Trainer
    Trainer(t, model=model, fit_statistics=False).fit()   # full strategy: no LoRA to merge on export
    return prepared


def curve(valid_csv: Path) -> dict[str, list[float]]:
    """Validation learning curve {"step", "energy_per_atom_mae" (eV/atom), "forces_mae" (eV/Å)} of a run."""
    from foundation.train.csvlog import read_csv
    cols = read_csv(valid_csv)
    if not cols:
        raise FileNotFoundError(f"{valid_csv} is missing or empty: the run logged no validation")
    return {"step": cols["step"].tolist(), "energy_per_atom_mae": cols["valid/all/energy_per_atom_mae"].tolist(),
            "forces_mae": cols["valid/all/forces_mae"].tolist()}


# --- report -----------------------------------------------------------------------------------------------------
def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def format_rows(rows: list[dict]) -> str:
    """One line per run (test-set MAE: E in meV/atom and meV per structure, F in meV/Å, S in meV/Å³)."""
    def f(x, fmt):
        return f"{'-':>{fmt.split('.')[0]}s}" if x is None else format(x, fmt)
    lines = [f"{'target':12s} {'frames':>6s} {'arm':10s} {'params':>7s} {'CPU s':>6s} {'E meV/at':>9s} "
             f"{'E meV':>8s} {'F meV/Å':>8s} {'S meV/Å³':>9s}"]
    for r in rows:
        lines.append(f"{r['target']:12s} {r['frames']:6d} {r['arm']:10s} {r['params']:7d} {r['cpu_seconds']:6.0f} "
                     f"{r['e_mae_mev_atom']:9.2f} {r['e_mae_mev']:8.1f} {r['f_mae_mev_A']:8.1f} "
                     f"{f(r['s_mae_mev_A3'], '9.2f')}")
    return "\n".join(lines)


def comparison(rows: list[dict]) -> list[dict]:
    """Per (target, frames): test E (meV/atom) and F (meV/Å) MAE of both arms and the ratios fine-tuned/scratch."""
    by = {(r["target"], r["frames"], r["arm"]): r for r in rows}
    out = []
    for (target, n, arm), ft in by.items():
        sc = by.get((target, n, "scratch"))
        if arm != "finetuned" or sc is None:
            continue
        out.append({"target": target, "frames": n, "e_finetuned": ft["e_mae_mev_atom"],
                    "e_scratch": sc["e_mae_mev_atom"], "e_ratio": ft["e_mae_mev_atom"] / sc["e_mae_mev_atom"],
                    "f_finetuned": ft["f_mae_mev_A"], "f_scratch": sc["f_mae_mev_A"],
                    "f_ratio": ft["f_mae_mev_A"] / sc["f_mae_mev_A"]})
    return out


def format_comparison(comp: list[dict]) -> str:
    lines = [f"{'target':12s} {'frames':>6s} {'E ft':>8s} {'E scr':>8s} {'E ratio':>7s} {'F ft':>8s} {'F scr':>8s} "
             f"{'F ratio':>7s}   (test MAE: E meV/atom, F meV/Å; ratio = fine-tuned / scratch)"]
    for c in comp:
        lines.append(f"{c['target']:12s} {c['frames']:6d} {c['e_finetuned']:8.2f} {c['e_scratch']:8.2f} "
                     f"{c['e_ratio']:7.2f} {c['f_finetuned']:8.1f} {c['f_scratch']:8.1f} {c['f_ratio']:7.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], out_png: Path) -> Path:
    """Per target (row): validation F and E MAE vs step (fine-tuned solid, scratch dashed, a colour per size) and
    test MAE vs training frames."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = list(dict.fromkeys(r["target"] for r in rows))
    sizes = sorted({r["frames"] for r in rows})
    colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0.0, 0.8, len(sizes)))))
    fig, axes = plt.subplots(len(targets), 3, figsize=(13, 3.6 * len(targets)), squeeze=False)
    for ax_row, target in zip(axes, targets):
        mine = [r for r in rows if r["target"] == target]
        for r in mine:
            style = {"finetuned": "-", "scratch": "--"}.get(r["arm"], ":")
            c, label = r["curve"], f"{r['arm']}, {r['frames']} frames"
            ax_row[0].plot(c["step"], 1000 * np.array(c["forces_mae"]), style, color=colors[r["frames"]], label=label)
            ax_row[1].plot(c["step"], 1000 * np.array(c["energy_per_atom_mae"]), style, color=colors[r["frames"]])
        for arm, style in (("finetuned", "o-"), ("scratch", "s--"), ("rescaled", "^:")):
            pts = sorted((r["frames"], r["f_mae_mev_A"], r["e_mae_mev_atom"]) for r in mine if r["arm"] == arm)
            if pts:
                n, f, e = map(np.array, zip(*pts))
                ax_row[2].plot(n, f, style, color="C0", label=f"F (meV/Å), {arm}")
                ax_row[2].plot(n, e, style, color="C3", label=f"E (meV/atom), {arm}")
        ax_row[0].set(title=f"{target}: validation force MAE", xlabel="optimizer step", ylabel="meV/Å", yscale="log")
        ax_row[1].set(title=f"{target}: validation energy MAE", xlabel="optimizer step", ylabel="meV/atom",
                      yscale="log")
        ax_row[2].set(title=f"{target}: test MAE", xlabel="training frames", xscale="log", yscale="log")
        ax_row[0].legend(fontsize=6)
        ax_row[2].legend(fontsize=6)
    fig.suptitle("solid: fine-tuned from the pretrained model; dashed: from scratch (same steps and schedule); "
                 "dotted: fine-tuned with the head rescaled to the target",
                 fontsize=9)
    from foundation.train.plots import save_figure
    return save_figure(fig, out_png, dpi=80)


# --- driver -----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with rmd17/ and mlearn/")
    p.add_argument("--out", default="runs/study_pretraining", help="work folder (datasets, runs, figure, JSON)")
    p.add_argument("--json", default=None, help="also write the result JSON here (always: OUT/study.json)")
    p.add_argument("--targets", default="paracetamol,li", help="comma list of paracetamol, li")
    p.add_argument("--sizes", default="10,50,200", help="training frames of the targets")
    p.add_argument("--every", type=int, default=10, help="take every k-th frame of the rMD17 pretraining files")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every fine-tuned and scratch run")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--L", type=int, default=0, help="hidden feature order max_L (0, 1, 2)")
    p.add_argument("--r-max", type=float, default=5.0, help="cutoff, Å")
    p.add_argument("--pretrain-lr", type=float, default=0.01, help="peak learning rate of pretraining (cosine)")
    p.add_argument("--lr", type=float, default=0.005,
                   help="peak learning rate (cosine, 5%% warmup) of every fine-tuned and scratch run")
    p.add_argument("--arms", default="finetuned,scratch",
                   help="comma list of finetuned, scratch (run the arms in separate processes on the same --out, "
                        "then once more with both: finished runs are read back)")
    p.add_argument("--max-atoms-pretrain", type=int, default=256, help="atom budget of a pretraining batch")
    p.add_argument("--max-atoms-molecule", type=int, default=100, help="5 paracetamol molecules per batch")
    p.add_argument("--max-atoms-li", type=int, default=200, help="about 4 Li cells per batch")
    p.add_argument("--valid-frames-molecule", type=int, default=50)
    p.add_argument("--valid-frames-li", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, sizes 10, few frames and steps")
    a = p.parse_args(argv)
    a.quick_frames = 0
    if a.quick:
        a.sizes, a.every, a.pretrain_steps, a.steps, a.channels = "10", 100, 6, 4, 8
        a.valid_frames_molecule, a.valid_frames_li, a.quick_frames = 5, 5, 12
    a.sizes = sorted(int(s) for s in str(a.sizes).split(","))
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [t for t in a.targets if t not in TARGETS] + [x for x in a.arms if x not in ARMS]
    if bad:
        raise ValueError(f"unknown --targets/--arms {bad}; targets: {sorted(TARGETS)}, arms: {list(ARMS)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    data = Path(a.data).resolve()
    if not (data / "rmd17").is_dir() or not (data / "mlearn").is_dir():
        print(f"study_pretraining: data folder {data} (with rmd17/ and mlearn/) not found; nothing to do "
              "(pass --data DIR)")
        return 0
    import torch
    torch.set_num_threads(a.threads)
    work = Path(a.out).resolve()
    settings = {k: v for k, v in vars(a).items()}
    t0 = time.process_time()
    paths = prepare_data(a, data, work / "data")
    data_cpu = time.process_time() - t0
    pre = run_pretrain(a, paths["pretrain"], work) if set(a.arms) - {"scratch"} else None
    rows = [run_target(a, target, n, arm, paths, work) for n in a.sizes for target in a.targets for arm in a.arms]
    comp = comparison(rows)
    figure = plot(rows, work / "pretraining_study.png")
    pre = pre or {"metrics": {}, "cpu_seconds": 0.0, "wall_seconds": 0.0, "params": 0, "load": None}
    train_cpu = pre["cpu_seconds"] + sum(r["cpu_seconds"] for r in rows)
    result = {"settings": settings, "data_cpu_seconds": data_cpu, "pretrain": {k: pre[k] for k in (
        "metrics", "cpu_seconds", "wall_seconds", "params", "load")}, "rows": rows, "comparison": comp,
        "training_cpu_seconds": train_cpu, "figure": str(figure)}
    for path in [work / "study.json"] + ([Path(a.json)] if a.json else []):
        path.write_text(json.dumps(result, indent=1))
    from foundation.train.metrics import format_table
    print("\npretraining validation (EMA weights):\n" + format_table(pre["metrics"]))
    print("\n" + format_rows(rows) + "\n\n" + format_comparison(comp))
    print(f"\ntraining CPU time: {train_cpu / 60:.1f} core-min (pretraining {pre['cpu_seconds'] / 60:.1f}); "
          f"figure {figure}; load {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
