"""Fine-tuning vs training from scratch at equal steps, and forgetting with and without replay (issue 6).

From nothing (or from a given corpus / base model):
  1. the demo corpus (``foundation.data.generate``; ``--data DIR`` reuses one), split once, seeded:
     metals -> pretraining train / pretraining validation (``--metals-valid`` structures, never trained on);
     held-out Cu-Au -> N training frames (``--frames``), validation (learning curves), test (final table);
  2. a base model pretrained by ``foundation pretrain``'s path: recipes/pretrain_small.yaml with --set
     overrides (metals only by default, ``--pretrain-steps``), or ``--base DIR`` (a base pretrained by this
     script with the same ``--data`` and ``--split-seed``, so that it never saw the metals validation split:
     the script cannot check that);
  3. every variant trains the same N frames for the same steps with the same optimizer, schedule, loss and EMA
     (those of recipes/finetune_demo_cuau.yaml):
       full / frozen / lora / replay: ``foundation.finetune.run.finetune`` (a new head ``cuau`` copied from
         ``emt``; replay adds a 200-structure sample of the pretraining metals on ``emt``);
       full_inplace: full fine-tuning of the ``emt`` head itself (the naive user path, no new head);
       scratch: the base's architecture, random weights, ``foundation.train.loop.run`` (E0/scale from the N
         frames); scratch@LR: the same at another peak learning rate;
  4. measures: energy/forces/stress MAE on the Cu-Au test split (``foundation.evaluate``); forgetting:
     MAE on the pretraining metals validation split with head ``emt`` before and after each fine-tuning;
     learning curves (validation MAE vs step, EMA weights) from each run's valid.csv -> PNG; everything -> JSON.

    python scripts/study_finetune.py --data data/demo --out runs/study_finetune      # 2000 + 6 x 300 steps, 1 thread
    python scripts/study_finetune.py --quick --out /tmp/study_ft                      # smoke test (tiny preset)
    python scripts/study_finetune.py ... --reuse     # tables/figure again from finished runs; train only the rest
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = "full,frozen,lora,replay,full_inplace,scratch"
PROPS = ("energy_per_atom", "forces", "stress")     # MAE x 1000: meV/atom, meV/Å, meV/Å³


# --- data ------------------------------------------------------------------------------------------------------
def corpus(args) -> Path:
    """The demo corpus directory (metals/, heldout/): ``--data`` as given, else generated under ``--out``."""
    if args.data:
        data = Path(args.data)
        for part in ("metals", "heldout"):
            if not (data / part / "manifest.json").is_file():
                raise FileNotFoundError(f"--data {data}: no dataset {data / part} (manifest.json); make it with "
                                        f"'foundation data generate --preset demo --out {data}'")
        return data
    from foundation.data.generate import generate
    data = Path(args.out) / "data"
    if not all((data / p / "manifest.json").is_file() for p in ("metals", "heldout")):
        generate(args.preset, data, seed=args.seed)
    return data


def write_subset(src: Path, indices: np.ndarray, out: Path, name: str) -> str:
    """Structures ``indices`` of dataset ``src`` as a new dataset ``out`` (labels kept exactly, via an ASE db)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect
    from ase.stress import full_3x3_to_voigt_6_stress

    from foundation import keys
    from foundation.data import ShardedDataset
    from foundation.data.convert import convert
    if (out / "manifest.json").is_file():
        return str(out)
    ds = ShardedDataset(src)
    db_path = out.parent / f"{name}.db"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db_path.unlink(missing_ok=True)
    with connect(db_path, use_lock_file=False) as db:
        for i in np.sort(indices):
            rec = ds.record(int(i))
            atoms = Atoms(numbers=rec[keys.ATOMIC_NUMBERS].astype(int), positions=rec[keys.POSITIONS],
                          cell=rec[keys.CELL].reshape(3, 3), pbc=rec[keys.PBC].reshape(3))
            res = {k: rec[k] for k in (keys.ENERGY, keys.FORCES) if k in rec}
            if keys.STRESS in rec:
                res[keys.STRESS] = full_3x3_to_voigt_6_stress(rec[keys.STRESS].reshape(3, 3))
            atoms.calc = SinglePointCalculator(atoms, **res)
            db.write(atoms)
    convert([db_path], out, r_max=5.0, dataset_name=name, progress=False)
    db_path.unlink()
    return str(out)


def split_corpus(data: Path, out: Path, args) -> dict:
    """Seeded splits: metals_train / metals_valid, cuau_train (N) / cuau_valid / cuau_test. Paths and sizes."""
    from foundation.data import ShardedDataset
    rng = np.random.default_rng([args.split_seed, 6])
    n_metals, n_cuau = len(ShardedDataset(data / "metals")), len(ShardedDataset(data / "heldout"))
    need = args.frames + args.valid_frames + args.test_frames
    if need > n_cuau or args.metals_valid >= n_metals:
        raise ValueError(f"{data}: heldout has {n_cuau} structures, metals {n_metals}; --frames + --valid-frames + "
                         f"--test-frames = {need} and --metals-valid = {args.metals_valid} must fit: lower them")
    metals, cuau = rng.permutation(n_metals), rng.permutation(n_cuau)
    a, b = args.frames, args.frames + args.valid_frames
    parts = {"metals_valid": (data / "metals", metals[:args.metals_valid]),
             "metals_train": (data / "metals", metals[args.metals_valid:]),
             "cuau_train": (data / "heldout", cuau[:a]), "cuau_valid": (data / "heldout", cuau[a:b]),
             "cuau_test": (data / "heldout", cuau[b:need])}
    record = {"data": str(Path(data).resolve()), "split_seed": args.split_seed,
              "sizes": {k: int(len(idx)) for k, (_, idx) in parts.items()}}
    if (out / "splits.json").is_file() and json.loads((out / "splits.json").read_text()) != record:
        raise ValueError(f"{out} holds splits made with other settings ({out / 'splits.json'}); use a new --out "
                         "(or the same --data, --split-seed and sizes)")
    paths = {k: write_subset(src, idx, out / k, k) for k, (src, idx) in parts.items()}
    (out / "splits.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.with_molecules and (data / "molecules" / "manifest.json").is_file():
        paths["molecules"] = str(data / "molecules")
    return {"paths": paths, "sizes": record["sizes"]}


# --- the base model ------------------------------------------------------------------------------------------
def pretrain(args, splits: dict) -> tuple[Path, dict]:
    """recipes/pretrain_small.yaml with --set overrides -> (model dir, the base's validation metrics)."""
    from foundation.train.config import load_config
    from foundation.train.loop import run
    p, steps = splits["paths"], args.pretrain_steps
    train, heads, valid = [p["metals_train"]], ["emt"], [p["metals_valid"]]
    if "molecules" in p:
        train, heads = train + [p["molecules"]], heads + ["gfn2_xtb"]
    sets = [f"out_dir={Path(args.out) / 'base'}", f"max_steps={steps}", f"valid_every={max(1, steps // 8)}",
            f"checkpoint_every={steps}", "progress=false", f"log_every={max(1, steps // 20)}", f"seed={args.seed}",
            f"data.train=[{','.join(train)}]", f"data.heads=[{','.join(heads)}]",
            f"data.valid=[{','.join(valid)}]"] + list(args.pretrain_set)
    config = load_config(args.pretrain_recipe, sets)
    metrics = run(config)
    return Path(config.out_dir) / "model", metrics


# --- the variants ------------------------------------------------------------------------------------------
def common_sets(args, name: str, splits: dict) -> list[str]:
    p, steps = splits["paths"], args.steps
    return [f"out_dir={Path(args.out) / 'runs' / name}", f"max_steps={steps}", f"seed={args.seed}",
            f"valid_every={max(1, steps // args.curve_points)}", f"checkpoint_every={steps}", "progress=false",
            f"log_every={max(1, steps // 20)}", f"data.train=[{p['cuau_train']}]", f"data.valid=[{p['cuau_valid']}]"
            ] + list(args.finetune_set)


def run_finetune(args, name: str, base: Path, splits: dict) -> dict:
    """One fine-tuning strategy through ``foundation.finetune.run.finetune`` with the shipped recipe."""
    from foundation.finetune.config import load_finetune_config
    from foundation.finetune.run import finetune
    strategy, inplace = name.split("_")[0], name.endswith("_inplace")
    p = splits["paths"]
    sets = common_sets(args, name, splits) + [f"base.model={base}", "base.head=emt", f"finetune.strategy={strategy}",
                                              f"finetune.monitor=[{p['metals_valid']}]"]
    if inplace:
        sets.append("finetune.head=null")
    if strategy == "replay":
        sets.append(f"replay.data=[{p['metals_train']}]")
    else:
        sets.append("replay=null")
    config = load_finetune_config(args.finetune_recipe, sets)
    res = finetune(config, log=lambda m: print(m, flush=True))
    forget = res.get("forgetting") or {}
    trainable = sum(p.numel() for p in res["model"].parameters() if p.requires_grad)
    return {"model_dir": str(res["model_dir"]), "head": res["heads"][0], "lr": config.optim.lr,
            "step0": {k: _mae(res["zero_shot"]["refit_e0"], k) for k in PROPS}, "e0_new": res["e0_new"],
            "trainable_parameters": int(trainable),
            "forgetting": {"before": {k: _mae(forget.get("base", {}), k) for k in PROPS},
                           "after": {k: _mae(forget.get("finetuned", {}), k) for k in PROPS}}}


def run_scratch(args, name: str, base: Path, splits: dict) -> dict:
    """The base's architecture with random weights, trained by ``foundation.train.loop.run`` on the same frames
    with the fine-tuning recipe's optimizer/schedule/loss/EMA (``scratch@LR``: peak learning rate LR)."""
    import torch

    from foundation.finetune.config import load_finetune_config
    from foundation.model import FoundationModel, ModelConfig
    from foundation.train.config import training_keys
    from foundation.train.loop import run
    sets = common_sets(args, name, splits) + [f"base.model={base}", "finetune.strategy=full", "replay=null"]
    if "@" in name:
        sets.append(f"optim.lr={float(name.split('@')[1])}")
    train = training_keys(load_finetune_config(args.finetune_recipe, sets))   # the recipe's training keys
    train.data.heads = ["cuau"]
    arch = FoundationModel.from_pretrained(base).config.to_dict()
    for key in ("atomic_energies", "scale", "shift", "avg_num_neighbors", "foundation_version", "long_range"):
        arch.pop(key, None)
    torch.manual_seed(args.seed)
    model = FoundationModel(ModelConfig.from_dict({**arch, "heads": ["cuau"]}))
    run(train.validate(), model=model)
    return {"model_dir": str(Path(train.out_dir) / "model"), "head": "cuau", "lr": train.optim.lr,
            "trainable_parameters": int(sum(p.numel() for p in model.parameters())), "forgetting": None}


def _mae(metrics: dict, prop: str) -> float | None:
    entry = metrics.get(f"all/{prop}")
    return None if entry is None else float(entry["mae"])


def curve(run_dir: Path) -> dict:
    """Validation MAE (EMA weights) vs optimizer step from the run's valid.csv."""
    from foundation.train.csvlog import read_csv
    valid = read_csv(run_dir / "valid.csv")
    return {"step": [int(s) for s in valid["step"]],
            **{k: [float(v) for v in valid[f"valid/all/{k}_mae"]] for k in PROPS if f"valid/all/{k}_mae" in valid}}


def test_errors(model, test: str, head: str) -> dict:
    """MAE of energy per atom (eV/atom), forces (eV/Å), stress (eV/Å³) on the Cu-Au test split."""
    from foundation.evaluate import evaluate
    res = evaluate(model, [test], head=head)
    return {k: _mae(res, k) for k in PROPS}


def zero_shot(base: Path, e0: dict, test: str) -> dict:
    """The base model on the test split (head emt) with the fine-tuning's least-squares E0 refit."""
    from foundation.model import FoundationModel
    model = FoundationModel.from_pretrained(base)
    model.set_statistics(atomic_energies=e0, head="emt")
    return test_errors(model, test, "emt")


# --- output --------------------------------------------------------------------------------------------------
def _f(v, scale=1000.0, digits=1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _pct(after, before) -> str:
    return "-" if after is None or not before else f"{100 * (after / before - 1):+.1f}%"


def format_test_table(rows: list[dict]) -> str:
    """One row per variant: Cu-Au test MAE (meV/atom, meV/Å, meV/Å³), steps, CPU s."""
    lines = [f"{'variant':16s} {'steps':>5s} {'lr':>7s} {'E meV/atom':>10s} {'F meV/Å':>8s} {'S meV/Å³':>8s} "
             f"{'CPU s':>6s}"]
    for r in rows:
        t = r["test"]
        lines.append(f"{r['variant']:16s} {r['steps']:5d} {_f(r.get('lr'), 1, 4) if r.get('lr') else '-':>7s} "
                     f"{_f(t['energy_per_atom'], digits=2):>10s} {_f(t['forces']):>8s} {_f(t['stress'], digits=2):>8s} "
                     f"{_f(r.get('cpu_s'), 1, 0):>6s}")
    return "\n".join(lines)


def format_forgetting_table(rows: list[dict]) -> str:
    """Pretraining metals validation MAE (head emt) before -> after each fine-tuning, relative change."""
    lines = [f"{'variant':16s} {'E before':>9s} {'E after':>8s} {'dE':>7s} {'F before':>9s} {'F after':>8s} "
             f"{'dF':>7s} {'S before':>9s} {'S after':>8s} {'dS':>7s}"]
    for r in rows:
        fg = r.get("forgetting")
        if not fg:
            continue
        b, a = fg["before"], fg["after"]
        cells = []
        for k, d in (("energy_per_atom", 2), ("forces", 1), ("stress", 2)):
            cells += [f"{_f(b[k], digits=d):>9s}", f"{_f(a[k], digits=d):>8s}", f"{_pct(a[k], b[k]):>7s}"]
        lines.append(f"{r['variant']:16s} " + " ".join(cells))
    return "\n".join(lines)


def plot_curves(rows: list[dict], png: Path, title: str) -> Path:
    """Validation force and energy MAE vs step, every variant on one axes each, log y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        c = r["curve"]
        for ax, k in zip(axes, ("forces", "energy_per_atom")):
            steps, ys = list(c["step"]), list(c.get(k, []))
            if r.get("step0") and r["step0"].get(k) is not None:
                steps, ys = [0] + steps, [r["step0"][k]] + ys
            ls = "--" if r["variant"].startswith("scratch") else "-"
            ax.plot(steps, 1000 * np.asarray(ys), ls, marker="o", ms=2.5, lw=1.2, label=r["variant"])
    for ax, label in zip(axes, ("validation force MAE (meV/Å)", "validation energy MAE (meV/atom)")):
        ax.set(xlabel="optimizer step", ylabel=label, yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    from foundation.train.plots import save_figure
    return save_figure(fig, png, dpi=90)


# --- main ----------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study_finetune")
    p.add_argument("--data", default=None, help="demo corpus dir (metals/, heldout/); default: generate --preset")
    p.add_argument("--preset", default="demo", help="foundation.data.generate preset when --data is not given")
    p.add_argument("--base", default=None, help="a pretrained model dir (skips pretraining; must have head 'emt')")
    p.add_argument("--pretrain-recipe", default=str(ROOT / "recipes" / "pretrain_small.yaml"))
    p.add_argument("--finetune-recipe", default=str(ROOT / "recipes" / "finetune_demo_cuau.yaml"))
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE", help="more pretrain --set")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="more --set for every variant (fine-tunes and scratch alike)")
    p.add_argument("--with-molecules", action="store_true", help="pretrain on metals + molecules (two heads)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every variant (equal)")
    p.add_argument("--frames", type=int, default=80, help="Cu-Au training frames N")
    p.add_argument("--valid-frames", type=int, default=60)
    p.add_argument("--test-frames", type=int, default=100)
    p.add_argument("--metals-valid", type=int, default=80, help="pretraining metals validation structures")
    p.add_argument("--variants", default=VARIANTS, help=f"comma list (default {VARIANTS}; also scratch@LR)")
    p.add_argument("--curve-points", type=int, default=12, help="validations per run")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and of every variant")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the data splits (keep it when reusing a base: its metals validation must stay unseen)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true",
                   help="reuse the base and the variants already finished under --out (their JSON), train the rest")
    p.add_argument("--figure", default=None, help="also write the learning-curve PNG here")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny preset, 8-channel model, a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.pretrain_steps, args.steps, args.curve_points = "tiny", 8, 6, 3
        args.frames, args.valid_frames, args.test_frames, args.metals_valid = 8, 4, 8, 10
        args.pretrain_set = ["model.overrides.num_channels=8", "data.max_atoms=64"] + args.pretrain_set
        args.finetune_set = ["data.max_atoms=64"] + args.finetune_set
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    import foundation.evaluate  # noqa: F401  (imported up front: one consistent library for the whole run)
    import foundation.finetune.run  # noqa: F401
    import foundation.train.loop  # noqa: F401
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.time()
    data = corpus(args)
    splits = split_corpus(data, out / "splits", args)
    print("splits:", splits["sizes"], flush=True)
    base_info = {"given": args.base}
    if args.base:
        base = Path(args.base)
    elif args.reuse and (out / "base" / "base.json").is_file():
        base_info = json.loads((out / "base" / "base.json").read_text())
        base = Path(base_info["model_dir"])
    else:
        c0 = time.process_time()
        base, metrics = pretrain(args, splits)
        base_info.update(steps=args.pretrain_steps, cpu_s=time.process_time() - c0, model_dir=str(base),
                         valid={k: _mae(metrics, k) for k in PROPS})
        (out / "base" / "base.json").write_text(json.dumps(base_info, indent=1) + "\n")
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        saved = out / "runs" / f"{name}.json"
        if args.reuse and saved.is_file():
            rows.append(json.loads(saved.read_text()))
            print(f"{name}: reused {saved}", flush=True)
            continue
        c0, w0 = time.process_time(), time.time()
        info = run_scratch(args, name, base, splits) if name.startswith("scratch") else \
            run_finetune(args, name, base, splits)
        cpu, wall = time.process_time() - c0, time.time() - w0
        info.update(variant=name, steps=args.steps, cpu_s=cpu, wall_s=wall,
                    curve=curve(out / "runs" / name), test=test_errors(info["model_dir"], splits["paths"]["cuau_test"],
                                                                       info["head"]))
        saved.write_text(json.dumps(info, indent=1, default=str) + "\n")
        rows.append(info)
        print(f"{name}: test F MAE {_f(info['test']['forces'])} meV/Å ({cpu:.0f} CPU s)", flush=True)
    e0 = next((r["e0_new"] for r in rows if r.get("e0_new") and r["head"] == "cuau"), None)
    zs = {"variant": "base (zero-shot)", "steps": 0, "test": zero_shot(base, e0, splits["paths"]["cuau_test"])} \
        if e0 else None
    table_rows = ([zs] if zs else []) + rows
    n = splits["sizes"]["cuau_train"]
    print(f"\nCu-Au test split ({splits['sizes']['cuau_test']} structures), {n} training frames, MAE:")
    print(format_test_table(table_rows))
    print("\nforgetting: pretraining metals validation "
          f"({splits['sizes']['metals_valid']} structures, head emt), MAE before -> after:")
    print(format_forgetting_table(rows))
    png = plot_curves(rows, out / "finetune_curves.png",
                      f"Cu-Au (EMT), {n} training frames, validation on {splits['sizes']['cuau_valid']} "
                      f"(EMA weights): fine-tuned vs from scratch at equal steps")
    if args.figure:
        plot_curves(rows, Path(args.figure), f"Cu-Au (EMT), {n} training frames, validation on "
                    f"{splits['sizes']['cuau_valid']} (EMA weights): fine-tuned vs from scratch at equal steps")
    result = {"args": vars(args), "load_before": load0, "load_after": os.getloadavg(), "wall_s": time.time() - t0,
              "torch_threads": torch.get_num_threads(), "sizes": splits["sizes"], "base": base_info,
              "zero_shot": zs, "variants": [{k: v for k, v in r.items() if k != "e0_new"} for r in rows],
              "figure": str(png)}
    (out / "study_finetune.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out / 'study_finetune.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
