"""Benchmark ``foundation learn``: does committee selection beat random selection of the same number of labels?

    python scripts/bench_learn.py                          # from the repository root; ~40 min at a load of 4-5
    python scripts/bench_learn.py --seeds 0 --json runs/bench_learn/seed0.json   # one seed (merge with --merge)
    python scripts/bench_learn.py --recipe-settings --iterations 2   # the recipe's own settings (the 2026-12-02 run)
    python scripts/bench_learn.py --quick                  # smoke test: tiny sizes, 1 seed

System: Cu-Au alloys labelled by ASE's EMT (``recipes/learn_cuau_emt.yaml``): a small base trained from scratch
on pure Cu and pure Au only (built once, shared by every seed and arm), then per seed:

- loop: ``foundation learn`` with a committee of K members, ``--iterations`` iterations; after each, the
  committee's test error and its number of labels;
- random: the same iteration-0 labels plus the same number of frames the loop added, drawn uniformly at random
  from all the frames of the loop's own MD explorations, labelled by EMT and used to train a committee of K
  members with the same settings (same steps, seeds, learning rate);
- base: the base model zero-shot.

Settings: the recipe's, with the benchmark's overrides ``BENCH`` on top (unless ``--recipe-settings``), then any
``--set``. ``BENCH`` gives selection a fair chance: 300 fine-tuning steps per member instead of 60 (the recipe's
are sized for a 1-minute demo), 4 iterations of at most 4 labels (so the loop has a point at <= half the final
label count), ``trust_lo: auto`` (the 0.9 quantile of the committee's max_devi_f on its own labelled frames, instead
of a fixed 0.05 eV/Å that almost every frame exceeded) and 120-step explorations (80 candidate frames per
iteration instead of 40).

Every arm is measured on the same held-out test set of the seed (EMT Langevin MD frames of the recipe's
structures at its test temperatures). Reported: test force MAE (meV/Å) of the loop per iteration and of the random
arm at the loop's final label count, and labels-to-reach-random-error: the fewest labels after which the loop's
test force MAE is at or below the random arm's. The load average is recorded at the start and after each seed.
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
BENCH = ["max_steps=300", "select.max_per_iteration=4", "select.trust_lo=auto", "select.trust_lo_quantile=0.9",
         "explore.steps=120"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "learn_cuau_emt.yaml"))
    p.add_argument("--out", default="runs/bench_learn")
    p.add_argument("--json", default=None, help="write the results here (default OUT/bench_learn.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--committee", type=int, default=4, help="members K")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--test-frames", type=int, default=60)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe key")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--recipe-settings", action="store_true", help="the recipe's settings without BENCH")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge result files of runs with one seed each (run in parallel) into --json")
    return p.parse_args(argv)


def overrides(args, seed: int) -> list[str]:
    out = [f"seed={seed}", f"committee.size={args.committee}", f"stop.max_iterations={args.iterations}",
           "stop.accurate_fraction=1.0", f"test.md_frames={args.test_frames}", "threads=1"]
    if not args.recipe_settings:
        out += BENCH
    if args.quick:
        out += ["max_steps=4", "base.build.max_steps=4", "base.build.md_steps=0", "explore.steps=10",
                "explore.interval=5", "explore.temperatures=[600.0]", "select.max_per_iteration=2",
                "test.md_frames=4", "select.trust_lo=0.0"]
    return out + list(args.set)


def load_config(args, seed: int, base: str | None, out_dir: Path):
    from foundation.learn.config import load_learn_config
    extra = [f"out_dir={out_dir}"]
    if base:
        extra += [f"base.model={base}", "base.build=null"]
    return load_learn_config(args.recipe, overrides(args, seed) + extra)


def shared_base(args, out: Path) -> str:
    """The recipe's base, built once into OUT/base (the first seed's settings)."""
    from foundation.distill.teacher import load_teacher
    from foundation.learn.explore import build_structures
    from foundation.learn.run import ensure_base
    config = load_config(args, args.seeds[0], None, out)
    base_dir, _ = ensure_base(config, load_teacher(config.labeller), build_structures(config.structures), out, print)
    return base_dir


def random_arm(config, out_dir: Path, report: dict, rng: np.random.Generator) -> dict:
    """A committee trained on the iteration-0 labels + as many random frames of the loop's explorations as the
    loop added; returns {"labels", "test"}."""
    from foundation.distill.teacher import load_teacher
    from foundation.learn.loop import label, read_frames, test_metrics, train_committee
    rows = report["iterations"]
    pool = [f for r in rows[1:] for f in read_frames(out_dir / f"iter-{r['iteration']:03d}" / "explore.extxyz")]
    added = sum(r.get("selected", 0) for r in rows[1:])
    picks = sorted(rng.choice(len(pool), size=min(added, len(pool)), replace=False).tolist())
    init = json.loads((out_dir / "iter-000" / "summary.json").read_text())["datasets"]
    teacher = load_teacher(config.labeller)
    labels = label(config, teacher, [pool[i] for i in picks], out_dir / "labels", None)
    datasets = init + ([labels["dataset"]] if labels["dataset"] else [])
    t0 = time.perf_counter()
    committee, _ = train_committee(config, config.base.model, datasets, out_dir / "random" / "committee", None)
    test = read_frames(out_dir / "test.extxyz")
    return {"labels": rows[0]["labels_total"] + labels["labelled"], "pool": len(pool),
            "training_s": time.perf_counter() - t0, "test": test_metrics(committee, test)}


def reach(loop_rows: list[dict], target: float) -> int | None:
    """Fewest labels after which the loop's test force MAE <= ``target`` (meV/Å); None if never."""
    for r in loop_rows:
        if "test" in r and r["test"]["force_mae_meV_per_A"] <= target:
            return r["labels_total"]
    return None


def run_seed(args, seed: int, base: str, out: Path) -> dict:
    from foundation.learn.run import learn
    out_dir = out / f"seed{seed}"
    config = load_config(args, seed, base, out_dir)
    t0 = time.perf_counter()
    report = learn(config, resume=(out_dir / "recipe.json").is_file())
    loop_s = time.perf_counter() - t0
    rnd = random_arm(config, out_dir, report, np.random.default_rng([seed, 2024]))
    rows = report["iterations"]
    final = rows[-1]
    needed = reach(rows, rnd["test"]["force_mae_meV_per_A"])
    return {"seed": seed, "loop_s": loop_s, "base_zero_shot": report["base_zero_shot"],
            "loop": [{k: r.get(k) for k in ("iteration", "labels_total", "explored", "trust_lo", "accurate_fraction",
                                           "candidate_fraction", "failed_fraction", "labels_added")}
                     | {"test": r.get("test")} for r in rows],
            "random": rnd, "labels_final": final["labels_total"], "labels_to_reach_random": needed,
            "fraction_of_random_labels": None if needed is None else needed / rnd["labels"],
            "calibration": report["calibration"], "load": os.getloadavg()}


def summary(results: list[dict]) -> str:
    lines = ["| seed | base zero-shot | loop, per iteration (labels: force MAE) | random at N | loop reaches "
             "random with |", "|---|---|---|---|---|"]
    for r in results:
        curve = ", ".join(f"{x['labels_total']}: {x['test']['force_mae_meV_per_A']:.1f}" for x in r["loop"]
                          if x.get("test"))
        need = r["labels_to_reach_random"]
        lines.append(f"| {r['seed']} | {r['base_zero_shot']['force_mae_meV_per_A']:.1f} | {curve} | "
                     f"{r['random']['labels']}: {r['random']['test']['force_mae_meV_per_A']:.1f} | "
                     + (f"{need} labels ({need / r['random']['labels']:.2f} of N)" if need else "not reached") + " |")
    return "\n".join(lines)


def merge(paths: list[str], target: Path) -> dict:
    """One result file from several (e.g. one seed each, run as parallel processes); prints the table."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {"meta": {"parts": [p["meta"] for p in parts]}, "results": [r for p in parts for r in p["results"]]}
    target.write_text(json.dumps(merged, indent=2) + "\n")
    print(summary(merged["results"]))
    return merged


def main(argv=None) -> int:
    args = parse(argv)
    if args.merge:
        merge(args.merge, Path(args.json or Path(args.out) / "bench_learn.json"))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.json or out / "bench_learn.json")
    meta = {"command": " ".join(sys.argv), "load_start": os.getloadavg(), "committee": args.committee,
            "iterations": args.iterations, "recipe": args.recipe, "overrides": overrides(args, 0)}
    t0 = time.perf_counter()
    base = shared_base(args, out / "shared")
    meta["base_s"] = time.perf_counter() - t0
    results = []
    for seed in args.seeds:
        results.append(run_seed(args, seed, base, out))
        meta["load_now"], meta["wall_s"] = os.getloadavg(), time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
