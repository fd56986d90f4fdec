"""Benchmark the distillation recipe: SevenNet-0 -> student for silicon, reduced to fit < 15 min on 2 CPU cores,
and the ablations at an equal number of optimizer steps: with vs without Hessian-vector matching, and (with
``--onpolicy-rounds N``) with H v plus N on-policy rounds.

    python scripts/bench_distill.py                      # from the repository root; needs `sevenn`
    python scripts/bench_distill.py --steps 400 --max-structures 16 --json runs/bench_distill/bench.json
    python scripts/bench_distill.py --onpolicy-rounds 1 --set optim.lr=0.01    # any recipe key
    python scripts/bench_distill.py --quick --recipe R.yaml   # smoke test: 4 steps, 2 seeds, tiny report

Every variant trains on the same cached teacher labels (built once; later variants reuse the cache) with the
same seed, data order and total steps; the switch-off rule is disabled so that "with H v" really trains with
it throughout. The on-policy variant trains ``steps - N * onpolicy_steps`` steps on the cached labels, then N
rounds of (student MD -> the frames where student and teacher disagree most -> teacher labels -> onpolicy_steps
more steps on everything): its total equals the others'. Speed (student vs teacher atom-steps/s, same run, same
structure) and NVE stability are measured in the first variant. Errors: vs held-out teacher labels and vs the
mlearn Si DFT test set (when present). The load average is recorded at the start and end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("hvp", "ef", "onpolicy")


def label(variant: str, args) -> str:
    """Table label of a variant."""
    if variant == "hvp":
        return f"E/F/S + H v (coef {args.hvp:g})"
    if variant == "ef":
        return "E/F/S only"
    return f"E/F/S + H v + {args.onpolicy_rounds} on-policy"


def overrides(args, variant: str, first: bool) -> list[str]:
    """``--set`` strings of one variant (``hvp``, ``ef`` or ``onpolicy``); ``first`` measures speed and NVE."""
    rounds = args.onpolicy_rounds if variant == "onpolicy" else 0
    stage1 = args.steps - rounds * args.onpolicy_steps
    if stage1 < 1:
        raise ValueError(f"--steps {args.steps} leaves no steps before {rounds} on-policy rounds of "
                         f"--onpolicy-steps {args.onpolicy_steps}; raise --steps or lower --onpolicy-steps")
    out = [f"out_dir={args.out}/{variant}", f"labels.cache_dir={args.out}/cache",
           f"seeds.max_structures={args.max_structures}", f"configurations.md_seeds={args.md_seeds}",
           f"configurations.md_steps={args.md_steps}", f"configurations.md_interval={args.md_interval}",
           f"configurations.rattle_copies={args.copies}", f"configurations.strain_copies={args.copies}",
           f"onpolicy.rounds={rounds}", f"onpolicy.steps={args.onpolicy_steps}",
           f"onpolicy.pick={args.onpolicy_pick}", f"onpolicy.seeds={args.onpolicy_seeds}",
           f"onpolicy.md_steps={args.onpolicy_md_steps}", f"max_steps={stage1}",
           f"valid_every={stage1}", f"checkpoint_every={stage1}", "log_every=25",
           "progress=false", "data.max_atoms=128", "labels.hvp_off_at_force_mae=null",
           f"loss.coefficients.hvp={0.0 if variant == 'ef' else args.hvp}"]
    if first:
        out += [f"report.speed_repeats={args.speed_repeats}", f"report.nve_steps={args.nve_steps}"]
    else:   # speed and NVE come from the first variant: measured once
        out += ["report.speed_repeats=1", "report.speed_steps=2", "report.nve_steps=0"]
    return out + list(args.set)


def row(name: str, report: dict, steps: int, wall: float) -> dict:
    """One table row (MAE: F eV/Å, E eV/atom, S eV/Å³, Hv eV/Å²; None where not measured)."""
    vt, ref = report["vs_teacher"], report["vs_reference"] or {}
    return {"variant": name, "steps": steps, "wall_s": wall,
            "F_vs_teacher": vt.get("forces_mae"), "E_vs_teacher": vt.get("energy_per_atom_mae"),
            "S_vs_teacher": vt.get("stress_mae"), "Hv_vs_teacher": vt.get("hvp_mae"),
            "F_student_vs_dft": (ref.get("student") or {}).get("forces_mae"),
            "F_teacher_vs_dft": (ref.get("teacher") or {}).get("forces_mae"),
            "F_ratio": ref.get("force_mae_ratio")}


def fmt(v, scale=1.0, digits=4):
    return "-" if v is None else f"{v * scale:.{digits}g}"


def table(rows: list[dict]) -> str:
    """The printed ablation table, one line per variant."""
    head = (f"{'variant':30s} {'steps':>5s} {'wall s':>7s} {'F/teach':>8s} {'E/teach':>8s} {'Hv/teach':>8s} "
            f"{'F stud/DFT':>10s} {'F teach/DFT':>11s} {'ratio':>6s}")
    lines = ["ablation at equal steps (MAE; F eV/Å, E meV/atom, Hv eV/Å²)", head]
    for r in rows:
        lines.append(f"{r['variant']:30s} {r['steps']:5d} {r['wall_s']:7.0f} {fmt(r['F_vs_teacher']):>8s} "
                     f"{fmt(r['E_vs_teacher'], 1000):>8s} {fmt(r['Hv_vs_teacher']):>8s} "
                     f"{fmt(r['F_student_vs_dft']):>10s} {fmt(r['F_teacher_vs_dft']):>11s} "
                     f"{fmt(r['F_ratio'], digits=3):>6s}")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "distill_sevenn_si.yaml"))
    p.add_argument("--out", default="runs/bench_distill")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each variant (equal)")
    p.add_argument("--hvp", type=float, default=5.0, help="hvp loss coefficient of the 'with H v' variants")
    p.add_argument("--max-structures", type=int, default=10, help="mlearn Si seeds (evenly spaced)")
    p.add_argument("--copies", type=int, default=1, help="rattled and strained copies per seed (each)")
    p.add_argument("--md-seeds", type=int, default=2)
    p.add_argument("--md-steps", type=int, default=20)
    p.add_argument("--md-interval", type=int, default=10)
    p.add_argument("--variants", default="hvp,ef", help=f"comma-separated, of {VARIANTS}; the first measures speed")
    p.add_argument("--onpolicy-rounds", type=int, default=0,
                   help="> 0 adds the variant 'onpolicy' (H v + this many on-policy rounds, equal total steps)")
    p.add_argument("--onpolicy-steps", type=int, default=50, help="optimizer steps after each on-policy round")
    p.add_argument("--onpolicy-pick", type=int, default=8, help="frames picked per round")
    p.add_argument("--onpolicy-seeds", type=int, default=4, help="student MD runs per round")
    p.add_argument("--onpolicy-md-steps", type=int, default=100, help="student MD steps per run")
    p.add_argument("--speed-repeats", type=int, default=None, help="alternated speed runs (default 3; --quick 1)")
    p.add_argument("--nve-steps", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override applied to every variant (repeatable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the whole run (default 1: oversubscribed threads distort the speed-up)")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 steps, 2 seeds, no MD, 1 speed repeat")
    p.add_argument("--parallel", action="store_true",
                   help="run each variant in its own process at the same time (the speed measurement then shares "
                        "the CPU with the other variants' training; the ratio is still same-run, alternated)")
    p.add_argument("--speed-of", default=None, metavar="MODEL_DIR",
                   help="only re-measure the speed of this trained student vs the recipe's teacher on the bench's "
                        "speed structure (--speed-repeats alternated runs, e.g. when the machine is less loaded)")
    p.add_argument("--child-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.max_structures, args.md_seeds, args.md_steps = 4, 2, 0, 0
        args.nve_steps, args.onpolicy_steps, args.onpolicy_md_steps = 5, 2, 10
        args.onpolicy_seeds, args.onpolicy_pick = 1, 2
        args.set = ["report.speed_steps=2", "labels.hvp_vectors=1"] + args.set
    if args.speed_repeats is None:
        args.speed_repeats = 1 if args.quick else 3
    variants = [v for v in args.variants.split(",") if v]
    if args.onpolicy_rounds > 0 and "onpolicy" not in variants and args.child_index is None:
        variants.append("onpolicy")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants {args.variants!r}: use a comma-separated list of {VARIANTS}")
    if "onpolicy" in variants and args.onpolicy_rounds < 1:
        p.error("the 'onpolicy' variant needs --onpolicy-rounds >= 1")
    args.variant_list = variants
    return args


def run_parallel(args) -> list[dict]:
    """Each variant in a child process of this script (``--variants v --child-index i``, log ``out/<v>.log``);
    returns the children's JSON dicts in variant order (the first one measured speed and NVE)."""
    import subprocess

    from foundation.train.engine import child_environment
    out, procs = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    base = [a for a in args.argv if a != "--parallel"]
    for i, v in enumerate(args.variant_list):
        part = out / f"part-{v}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--variants", v, "--child-index", str(i),
               "--json", str(part)]
        procs.append((v, part, subprocess.Popen(cmd, stdout=open(out / f"{v}.log", "w"), stderr=subprocess.STDOUT,
                                                env=child_environment())))
    parts = []
    for v, part, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"variant {v} failed (exit {proc.returncode}); see {out / (v + '.log')}")
        parts.append(json.loads(part.read_text()))
    return parts


def speed_only(args) -> dict:
    """Speed of the student in ``args.speed_of`` vs the recipe's teacher, on the structure the bench uses."""
    from foundation import FoundationModel
    from foundation.calculator import FoundationCalculator
    from foundation.distill.config import load_distill_config
    from foundation.distill.report import measure_speed, speed_structure
    from foundation.distill.seeds import load_seeds, plain
    from foundation.distill.teacher import load_teacher
    config = load_distill_config(args.recipe, overrides(args, args.variant_list[0], first=True))
    rc = config.report
    seeds, _ = load_seeds(config, None)
    atoms = speed_structure([plain(a) for a in seeds], rc.speed_supercell)
    student = FoundationCalculator(FoundationModel.from_pretrained(args.speed_of), dtype=rc.dtype)
    load_start = os.getloadavg()[0]
    sp = measure_speed(load_teacher(config.teacher).calculator, student, atoms, rc.speed_steps, args.speed_repeats,
                       rc.nve_temperature)
    sp.update(model=str(args.speed_of), load_average_1min={"start": load_start, "end": os.getloadavg()[0]})
    print(f"speed ({sp['structure']}, {sp['atoms']} atoms, NVE, best of {sp['repeats']} alternated runs, "
          f"{sp['torch_threads']} torch threads, load {load_start:.2f} -> {os.getloadavg()[0]:.2f}): student "
          f"{sp['student_atom_steps_per_s']:.4g}, teacher {sp['teacher_atom_steps_per_s']:.4g} atom-steps/s -> "
          f"{sp['speedup']:.3g}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(sp, indent=2, default=str) + "\n")
    return sp


def main(argv=None) -> int:
    args = parse(argv)
    if args.speed_of:
        import torch
        torch.set_num_threads(args.threads or torch.get_num_threads())
        speed_only(args)
        return 0
    if args.parallel and len(args.variant_list) > 1:
        return _main_parallel(args)
    import torch

    from foundation.distill.config import load_distill_config
    from foundation.distill.report import format_report
    from foundation.distill.run import distill
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start, t_start = os.getloadavg(), time.perf_counter()
    results, reports = [], {}
    for i, variant in enumerate(args.variant_list):
        first = (args.child_index if args.child_index is not None else i) == 0
        config = load_distill_config(args.recipe, overrides(args, variant, first=first))
        t0 = time.perf_counter()
        report = distill(config, log=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t0
        print(format_report(report), flush=True)
        results.append(row(label(variant, args), report, args.steps, wall))
        reports[variant] = report
    first = reports[args.variant_list[0]]
    summary(args, results, first["speed"], first["nve"], load_start, t_start,
            {"parameters": first["student"]["parameters"], "r_max": first["student"]["config"]["r_max"],
             "num_channels": first["student"]["config"]["num_channels"]},
            {v: r["training_datasets"] for v, r in reports.items()})
    return 0


def _main_parallel(args) -> int:
    load_start, t_start = os.getloadavg(), time.perf_counter()
    parts = run_parallel(args)
    first = parts[0]
    summary(args, [p["rows"][0] for p in parts], first["speed"], first["nve"], load_start, t_start,
            first["student"], {v: c for p in parts for v, c in p["configurations"].items()}, parallel=True)
    return 0


def summary(args, results, sp, nve, load_start, t_start, student, configurations, parallel=False) -> None:
    """Print the speed, NVE and ablation table; write the JSON (``--json``)."""
    print(f"\nspeed ({sp['structure']}, {sp['atoms']} atoms, NVE, best of {sp['repeats']} alternated runs, "
          f"{sp['torch_threads']} torch threads): student {sp['student_atom_steps_per_s']:.4g}, teacher "
          f"{sp['teacher_atom_steps_per_s']:.4g} atom-steps/s -> {sp['speedup']:.3g}x")
    if nve:
        print(f"student NVE {nve['steps']} steps at {nve['temperature_K']:g} K: |dEtot| "
              f"{nve['energy_drift_ev_per_atom']:.3g} eV/atom, {'stable' if nve['stable'] else 'UNSTABLE'}")
    print("\n" + table(results))
    load_end = os.getloadavg()
    print(f"total wall {time.perf_counter() - t_start:.0f} s; load average (1 min) {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end")
    if args.json:
        finite = all(math.isfinite(r[k]) for r in results for k in ("F_vs_teacher", "wall_s") if r[k] is not None)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k not in ("variant_list", "argv")},
             "variants": args.variant_list,
             "rows": results, "speed": sp, "nve": nve, "finite": finite,
             "student": student, "configurations": configurations, "parallel": parallel,
             "load_average_1min": {"start": load_start[0], "end": load_end[0]},
             "total_wall_s": time.perf_counter() - t_start}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
