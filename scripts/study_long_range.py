"""Long-range charges where the physics is long-ranged (issue 6): the same model with and without the head.

Data, labelled here with GFN2-xTB (tblite: energy, forces, charges, dipole): dimers at centre-of-mass (COM)
separations R of 3 Å to ``--r-far``, random orientations, 0.03 Å rattles: polar pairs (H2O-H2O, H2CO-H2O,
NH3-H2O), ion pairs of total charge 0 (HCOO- + NH4+, CH3COO- + CH3NH3+), a net-charged pair (NH4+ + H2O, +1),
and rattled xTB-relaxed monomers. Whole COM bands are held out for testing (``TEST_BANDS``, fixed before any
run); most test dimers have their closest intermolecular atom pair d_min beyond r_max (no graph edge joins
the molecules). Train and test go ASE db -> ``foundation.data.convert`` -> LMDB like any user's data.

Training: ``foundation.train.loop.run`` with the same preset/overrides, seed, data order and steps, once
without the head and once per ``--charge-loss`` coefficient with ``long_range: {kind: coulomb, sigma: 1 Å}``
and that coefficient on the xTB charges (0: energies and forces only), and once per ``--excess-loss``
coefficient on the label-free ``charge_excess`` term (the raw charges' excess over each structure's total
charge, ``foundation.train.loss``; no charge labels). Loss E:F = 1:10 per atom, energy 20 in
the last 20% of steps (as recipes/pretrain_small.yaml). The test set is the Trainer's validation set, evaluated
once, after the last step (cosine schedule: nothing is selected or stopped on it).

Report: test energy (meV per structure and per atom) and force MAE split at d_min = r_max (and per pair
kind); binding curves E_int(R) = E(dimer) - E(A) - E(B) at a fixed orientation (dipoles head-to-tail on the
axis) of an ion pair, an ion-dipole pair and a polar pair: xTB and every model (PNG), with molecule A's total
charge. Physics check (raises if violated): without the head E_int is exactly 0 wherever d_min > r_max.

    python scripts/study_long_range.py --out runs/study_long_range          # ~8 CPU-min at 1 thread (5 models)
    python scripts/study_long_range.py --quick --out /tmp/lr_quick          # smoke test
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
from _long_range_data import (  # noqa: E402
    PAIRS,
    TEST_BANDS,
    curve_geometries,
    d_min,
    in_test_band,
    make_dimers,
    make_monomers,
    monomers,
    write_dataset,
)


# --- training ----------------------------------------------------------------------------------------------
def variants(args) -> dict:
    """{name: None (no head) or (charges coefficient, charge_excess coefficient)} in training order."""
    out = {"without_lr": None}
    out.update({f"with_lr_q{q:g}": (q, 0.0) for q in args.charge_loss})
    out.update({f"with_lr_x{x:g}": (0.0, x) for x in args.excess_loss})
    return out


def train_config(args, train_dir: Path, valid_dir: Path, name: str, loss: tuple | None) -> dict:
    """The recipe (as a dict) of one variant: no head (None) or the head with these (charges, charge_excess)
    coefficients."""
    overrides = {"r_max": args.r_max, "num_channels": args.channels, "max_ell": 2, "correlation": 2,
                 "num_bessel": 8, "radial_mlp": [32, 32], "readout_mlp": 16}
    coefficients = {"energy": 1.0, "forces": 10.0}
    if loss is not None:
        overrides["long_range"] = {"kind": "coulomb", "sigma": 1.0}
        coefficients.update(charges=loss[0], charge_excess=loss[1])
    steps = args.steps
    return {"out_dir": str(Path(args.out) / name), "seed": args.seed, "max_steps": steps,
            "log_every": max(1, steps // 20), "valid_every": steps, "checkpoint_every": steps,
            "keep_checkpoints": 1, "progress": False,
            "data": {"train": [str(train_dir)], "valid": [str(valid_dir)], "max_atoms": args.max_atoms},
            "model": {"preset": "small", "overrides": overrides},
            "optim": {"name": "adamw", "lr": args.lr, "grad_clip": 10.0},
            "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.02},
            "loss": {"coefficients": coefficients, "schedule": [{"start": 0.8, "coefficients": {"energy": 20.0}}]},
            "engine": {"zero_stage": 0, "precision": "fp32"}, "ema": {"enabled": True, "decay": 0.99}}


def train(values: dict):
    """Train one variant with the project's Trainer; (exported FoundationModel in float64, wall s, CPU s)."""
    import torch

    from foundation import FoundationModel
    from foundation.train.config import config_from_dict
    from foundation.train.loop import run
    t0, c0 = time.perf_counter(), time.process_time()
    run(config_from_dict(values))
    model = FoundationModel.from_pretrained(Path(values["out_dir"]) / "model").to(torch.float64)
    return model, time.perf_counter() - t0, time.process_time() - c0


# --- evaluation --------------------------------------------------------------------------------------------
def predict(model, graphs: list) -> list[tuple[float, np.ndarray, np.ndarray | None]]:
    """(energy eV, forces (n,3) eV/Å, charges (n,) e or None) of each graph, float64, batches of 16."""
    from torch_geometric.data import Batch

    from foundation import keys
    out = []
    for i in range(0, len(graphs), 16):
        batch = Batch.from_data_list(graphs[i:i + 16])
        pred = {k: v.numpy() for k, v in model(batch, compute_forces=True).items()}
        for k, e in enumerate(pred[keys.ENERGY]):
            atoms = (batch.batch == k).numpy()
            charges = pred[keys.CHARGES][atoms] if keys.CHARGES in pred else None
            out.append((float(e), pred[keys.FORCES][atoms], charges))
    return out


def errors_on_test_set(model, test_dir: Path, info: list[dict], frames: list, r_max: float) -> list[dict]:
    """Per test structure: |dE| (eV), natoms, sum |dF| and 3n (eV/Å), d_min, kind; labels read from the LMDB."""
    import torch

    from foundation import keys
    from foundation.data import ShardedDataset
    ds = ShardedDataset(test_dir, r_max=r_max, dtype=torch.float64)
    graphs = [ds[i] for i in range(len(ds))]
    if len(graphs) != len(frames) or not all(   # records are in written order: check before pairing with info
            np.allclose(g[keys.POSITIONS].numpy(), f.positions, atol=1e-6) for g, f in zip(graphs, frames)):
        raise ValueError(f"{test_dir} does not hold the {len(frames)} test structures in written order; re-run")
    rows = []
    for g, meta, (e, f, q) in zip(graphs, info, predict(model, graphs)):
        ref_f, n = g[keys.FORCES].numpy(), meta["n_first"]
        dq = None if q is None else abs(float(q[:n].sum()) - float(g[keys.CHARGES][:n].sum()))
        rows.append({"de": abs(e - float(g[keys.ENERGY])), "natoms": len(ref_f), "df_count": ref_f.size,
                     "df_sum": float(np.abs(f - ref_f).sum()), "d_min": meta["d_min"], "kind": meta["kind"],
                     "dq_a": dq})
    return rows


def _maes(rows: list[dict]) -> dict:
    """Energy (meV, meV/atom), force (meV/Å) MAEs and the MAE of molecule A's total charge (me, vs xTB's)."""
    if not rows:
        return {"count": 0, "energy_mev": None, "energy_mev_per_atom": None, "forces_mev_per_a": None,
                "fragment_charge_me": None}
    dq = [r["dq_a"] for r in rows if r.get("dq_a") is not None]
    return {"count": len(rows), "energy_mev": 1000 * float(np.mean([r["de"] for r in rows])),
            "energy_mev_per_atom": 1000 * float(np.mean([r["de"] / r["natoms"] for r in rows])),
            "forces_mev_per_a": 1000 * sum(r["df_sum"] for r in rows) / sum(r["df_count"] for r in rows),
            "fragment_charge_me": 1000 * float(np.mean(dq)) if dq else None}


def summarise(rows: list[dict], r_max: float) -> dict:
    """MAEs (energy meV/structure and meV/atom, forces meV/Å) of d_min < r_max ("near"), d_min >= r_max ("far"),
    all, and "far:<kind>" per pair kind."""
    far = [r for r in rows if r["d_min"] >= r_max]
    out = {"near": _maes([r for r in rows if r["d_min"] < r_max]), "far": _maes(far), "all": _maes(rows)}
    out.update({f"far:{k}": _maes([r for r in far if r["kind"] == k]) for k in sorted({r["kind"] for r in far})})
    return out


def binding_curves(models: dict, curves: dict, r_max: float) -> dict:
    """Per pair: R (Å), d_min (Å), E_int (eV) of xTB and each model, molecule A's total charge (e, xTB and
    models with charges), RMSE beyond r_max (meV); raises if the model without the head has E_int != 0 there."""
    import torch

    from foundation.data import from_atoms
    out = {}
    for pair, (a, b, dimers) in curves.items():
        n = len(a)
        far = np.array([d_min(d, n) >= r_max for d in dimers])
        row = {"R": [d.info["R"] for d in dimers], "d_min": [d_min(d, n) for d in dimers],
               "xtb": [d.get_potential_energy() - a.get_potential_energy() - b.get_potential_energy() for d in dimers],
               "charge_a": {"xtb": [float(d.calc.results["charges"][:n].sum()) for d in dimers]}}
        graphs = [from_atoms(x, r_max=r_max, dtype=torch.float64) for x in (a, b, *dimers)]
        for name, model in models.items():
            pred = predict(model, graphs)
            energies = np.array([e for e, _, _ in pred])
            row[name] = (energies[2:] - energies[0] - energies[1]).tolist()
            if pred[0][2] is not None:
                row["charge_a"][name] = [float(q[:n].sum()) for _, _, q in pred[2:]]
            err = np.array(row[name]) - np.array(row["xtb"])
            row[f"{name}_far_rmse_mev"] = 1000 * float(np.sqrt(np.mean(err[far] ** 2))) if far.any() else None
        if "without_lr" in models and far.any():
            worst = row["without_lr_far_max_abs_eint"] = float(np.abs(np.array(row["without_lr"])[far]).max())
            if worst > 1e-9:   # physics: no edge joins the molecules, so the energy is exactly additive
                raise RuntimeError(f"{pair}: without the long-range head E_int = {worst:.3g} eV beyond r_max "
                                   f"(must be 0: the molecules share no graph edge)")
        out[pair] = row
    return out


# --- report ------------------------------------------------------------------------------------------------
def label_of(name: str) -> str:
    if name == "without_lr":
        return "without head"
    kind, coefficient = name[len("with_lr_")], name[len("with_lr_") + 1:]
    return f"with head, {'charges' if kind == 'q' else 'charge excess'} x{coefficient}"


def plot_curves(curves: dict, r_max: float, path: Path) -> Path:
    """One panel per pair: E_int (eV) against COM separation (Å); shaded where d_min > r_max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.8))
    for ax, (pair, row) in zip(np.atleast_1d(axes), curves.items()):
        far = [r for r, d in zip(row["R"], row["d_min"]) if d >= r_max]
        if far:
            ax.axvspan(min(far), max(row["R"]), color="0.92", label=f"d_min > r_max = {r_max:g} Å")
        ax.plot(row["R"], row["xtb"], "k-", lw=2.5, label="GFN2-xTB")
        names = [k for k in row if k == "without_lr" or (k.startswith("with_lr_") and not k.endswith("_mev"))]
        for i, name in enumerate(names):
            color = "C3" if name == "without_lr" else ["C0", "C1", "C2", "C4", "C5"][(i - 1) % 5]
            ax.plot(row["R"], row[name], "--" if name == "without_lr" else "-", lw=1.2, marker="so^v"[i % 4],
                    ms=2.5, color=color, label=label_of(name))
        ax.axhline(0.0, color="0.5", lw=0.5)
        ax.set(title=f"{pair} ({PAIRS[pair][2]})", xlabel="COM separation R (Å)", ylabel="E_int (eV)")
        ax.legend(fontsize=7)
    from foundation.train.plots import save_figure
    return save_figure(fig, path, dpi=80)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict, r_max: float) -> str:
    """Markdown tables: test MAEs per model and split; far-split energy MAE per pair kind; curve RMSE."""
    lines = ["| model | test split | structures | E MAE (meV) | E MAE (meV/atom) | F MAE (meV/Å) |",
             "|---|---|---:|---:|---:|---:|"]
    for model, errors in results["test"].items():
        for split, text in (("near", "d_min < r_max"), ("far", "d_min > r_max"), ("all", "all")):
            e = errors[split]
            lines.append(f"| {label_of(model)} | {text} | {e['count']} | {_fmt(e['energy_mev'])} | "
                         f"{_fmt(e['energy_mev_per_atom'])} | {_fmt(e['forces_mev_per_a'])} |")
    kinds = [k for k in next(iter(results["test"].values())) if k.startswith("far:")]
    lines += ["", "| model | " + " | ".join(f"{k[4:]}, d_min > r_max: E MAE meV (n); charge of A, MAE me"
                                             for k in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for model, errors in results["test"].items():
        lines.append(f"| {label_of(model)} | " + " | ".join(
            f"{_fmt(errors[k]['energy_mev'])} ({errors[k]['count']}); {_fmt(errors[k]['fragment_charge_me'], 0)}"
            for k in kinds) + " |")
    names = list(results["test"])
    lines += ["", "| binding curve: RMSE of E_int beyond r_max, meV (charge of A at the largest R, e) | xTB | "
              + " | ".join(map(label_of, names)) + " |", "|---|" + "---:|" * (len(names) + 1)]
    for pair, row in results["curves"].items():
        q = row["charge_a"]
        cells = [_fmt(row.get(f"{n}_far_rmse_mev")) + (f" ({q[n][-1]:+.2f})" if n in q else "") for n in names]
        lines.append(f"| {pair} | ({q['xtb'][-1]:+.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study_long_range")
    p.add_argument("--json", default=None, help="write the results here (default OUT/result.json)")
    p.add_argument("--figure", default=None, help="binding-curve PNG (default OUT/long_range_binding.png)")
    p.add_argument("--per-pair", type=int, default=60, help="dimers per pair (6 pairs)")
    p.add_argument("--monomer-copies", type=int, default=6, help="rattled copies of each of the 7 monomers")
    p.add_argument("--r-near", type=float, default=3.0, help="smallest COM separation (Å)")
    p.add_argument("--r-far", type=float, default=13.0, help="largest COM separation (Å)")
    p.add_argument("--r-max", type=float, default=4.5, help="model cutoff (Å)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps of each model (equal)")
    p.add_argument("--max-atoms", type=int, default=96, help="atom budget of a batch")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--charge-loss", type=float, nargs="*", default=[0.0, 100.0],
                   help="one model with the head per coefficient on the xTB charges (0: energies and forces only)")
    p.add_argument("--excess-loss", type=float, nargs="*", default=[1.0, 10.0],
                   help="one model with the head per charge_excess coefficient (no charge labels: the raw charges "
                        "of every structure, isolated molecules included, learn to sum to its total charge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny data and model, few steps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.per_pair, args.monomer_copies, args.steps, args.channels, args.max_atoms = 6, 1, 4, 8, 48
        args.charge_loss, args.excess_loss = args.charge_loss[-1:], args.excess_loss[-1:]
    import torch
    torch.set_num_threads(args.threads)
    out, rng, t0 = Path(args.out), np.random.default_rng(args.seed), time.perf_counter()
    mols = monomers()
    dimers, scf_failed = make_dimers(mols, args.per_pair, args.r_near, args.r_far, rng)
    mono = make_monomers(mols, args.monomer_copies, rng)
    train_frames = [d for d in dimers if not in_test_band(d.info["R"])] + mono
    test_frames = [d for d in dimers if in_test_band(d.info["R"])]
    if not any(d.info["d_min"] >= args.r_max for d in test_frames):
        raise ValueError(f"no test dimer has d_min > r_max = {args.r_max} Å; raise --per-pair or --r-far")
    train_dir, _ = write_dataset(train_frames, out / "data" / "train", "train")
    test_dir, test_info = write_dataset(test_frames, out / "data" / "test", "test")
    curves = curve_geometries(mols, np.arange(3.0, args.r_far + 1e-9, 1.0 if args.quick else 0.25))
    label_s = time.perf_counter() - t0
    print(f"labelled {len(dimers)} dimers + {len(mono)} monomers (+ binding curves) with GFN2-xTB in {label_s:.0f} s: "
          f"{len(train_frames)} train, {len(test_frames)} test (COM bands {TEST_BANDS} Å); {scf_failed} "
          "geometries redrawn after SCF failures", flush=True)
    models, timing = {}, {}
    for name, loss in variants(args).items():
        models[name], wall, cpu = train(train_config(args, train_dir, test_dir, name, loss))
        timing[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"trained {name}: {args.steps} steps in {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    results = {"test": {name: summarise(errors_on_test_set(m, test_dir, test_info, test_frames, args.r_max),
                                        args.r_max) for name, m in models.items()},
               "curves": binding_curves(models, curves, args.r_max)}
    figure = plot_curves(results["curves"], args.r_max, Path(args.figure or out / "long_range_binding.png"))
    print(table(results, args.r_max) + f"\n(r_max = {args.r_max:g} Å)\nfigure: {figure}")
    results.update(args=vars(args), timing=timing, label_s=label_s, test_bands=TEST_BANDS,
                   counts={"train": len(train_frames), "test": len(test_frames), "scf_failed": scf_failed},
                   loadavg=os.getloadavg(), torch_threads=torch.get_num_threads())
    json_path = Path(args.json or out / "result.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
