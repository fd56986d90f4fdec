"""Benchmark the distillation recipe: SevenNet-0 -> student for silicon, reduced to fit < 15 min on 2 CPU cores,
and the ablation with vs without Hessian-vector matching at an equal number of optimizer steps.

    python scripts/bench_distill.py                      # from the repository root; needs `sevenn`
    python scripts/bench_distill.py --steps 400 --max-structures 16 --json runs/bench_distill.json

Both variants train on the same cached teacher labels (built once; the second variant reuses the cache) with the
same seed, data order and steps; the switch-off rule is disabled in both so that "with H v" really trains with
it throughout. Speed (student vs teacher atom-steps/s, same run, same structure) and NVE stability are measured
in the first variant. Errors: vs held-out teacher labels and vs the mlearn Si DFT test set (when present).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(args, variant: str) -> list[str]:
    """``--set`` strings of one variant (``hvp`` or ``ef``)."""
    out = [f"out_dir={args.out}/{variant}", f"labels.cache_dir={args.out}/cache",
           f"seeds.max_structures={args.max_structures}", f"configurations.md_seeds={args.md_seeds}",
           f"configurations.md_steps={args.md_steps}", "configurations.md_interval=10",
           "configurations.rattle_copies=1", "configurations.strain_copies=1",
           "onpolicy.rounds=0", f"train.max_steps={args.steps}", f"train.valid_every={args.steps}",
           f"train.checkpoint_every={args.steps}", "train.log_every=25", "train.progress=false",
           "train.data.max_atoms=128", "train.loss.hvp_off_at_force_mae=null",
           f"train.loss.coefficients.hvp={args.hvp if variant == 'hvp' else 0.0}"]
    if variant == "hvp":
        out += [f"report.speed_repeats={args.speed_repeats}", f"report.nve_steps={args.nve_steps}"]
    else:   # speed and NVE come from the first variant: measured once
        out += ["report.speed_repeats=1", "report.speed_steps=2", "report.nve_steps=0"]
    return out


def row(name: str, report: dict, wall: float) -> dict:
    vt, ref = report["vs_teacher"], report["vs_reference"] or {}
    return {"variant": name, "steps": report["validation_steps"], "wall_s": wall,
            "F_vs_teacher": vt.get("forces_mae"), "E_vs_teacher": vt.get("energy_per_atom_mae"),
            "S_vs_teacher": vt.get("stress_mae"), "Hv_vs_teacher": vt.get("hvp_mae"),
            "F_student_vs_dft": (ref.get("student") or {}).get("forces_mae"),
            "F_teacher_vs_dft": (ref.get("teacher") or {}).get("forces_mae"),
            "F_ratio": ref.get("force_mae_ratio")}


def fmt(v, scale=1.0, digits=4):
    return "-" if v is None else f"{v * scale:.{digits}g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "distill_sevenn_si.yaml"))
    p.add_argument("--out", default="runs/bench_distill")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each variant (equal)")
    p.add_argument("--hvp", type=float, default=5.0, help="hvp loss coefficient of the 'with H v' variant")
    p.add_argument("--max-structures", type=int, default=10, help="mlearn Si seeds (evenly spaced)")
    p.add_argument("--md-seeds", type=int, default=2)
    p.add_argument("--md-steps", type=int, default=20)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--nve-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the whole run (default 1: oversubscribed threads distort the speed-up)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    import torch

    from foundation.train.distill import distill
    from foundation.train.distill_config import load_distill_config
    from foundation.train.distill_report import format_report
    if args.threads:
        torch.set_num_threads(args.threads)
    results, reports = [], {}
    for variant, label in (("hvp", f"E/F/S + H v (coef {args.hvp:g})"), ("ef", "E/F/S only")):
        config = load_distill_config(args.recipe, overrides(args, variant))
        t0 = time.perf_counter()
        report = distill(config, log=lambda m: print(m, flush=True))
        report["validation_steps"] = config.train.max_steps
        wall = time.perf_counter() - t0
        print(format_report(report), flush=True)
        results.append(row(label, report, wall))
        reports[variant] = report
    sp, nve = reports["hvp"]["speed"], reports["hvp"]["nve"]
    print(f"\nspeed ({sp['structure']}, {sp['atoms']} atoms, NVE, best of {sp['repeats']} alternated runs, "
          f"{sp['torch_threads']} torch threads): student {sp['student_atom_steps_per_s']:.4g}, teacher "
          f"{sp['teacher_atom_steps_per_s']:.4g} atom-steps/s -> {sp['speedup']:.3g}x")
    if nve:
        print(f"student NVE {nve['steps']} steps at {nve['temperature_K']:g} K: |dEtot| "
              f"{nve['energy_drift_ev_per_atom']:.3g} eV/atom, {'stable' if nve['stable'] else 'UNSTABLE'}")
    head = (f"{'variant':28s} {'steps':>5s} {'wall s':>7s} {'F/teach':>8s} {'E/teach':>8s} {'Hv/teach':>8s} "
            f"{'F stud/DFT':>10s} {'F teach/DFT':>11s} {'ratio':>6s}")
    print("\nablation at equal steps (MAE; F eV/Å, E meV/atom, Hv eV/Å²)\n" + head)
    for r in results:
        print(f"{r['variant']:28s} {r['steps']:5d} {r['wall_s']:7.0f} {fmt(r['F_vs_teacher']):>8s} "
              f"{fmt(r['E_vs_teacher'], 1000):>8s} {fmt(r['Hv_vs_teacher']):>8s} {fmt(r['F_student_vs_dft']):>10s} "
              f"{fmt(r['F_teacher_vs_dft']):>11s} {fmt(r['F_ratio'], digits=3):>6s}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results, "speed": sp, "nve": nve},
                                              indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
