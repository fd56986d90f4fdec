"""``foundation learn RECIPE.yaml``: a DP-GEN-style concurrent-learning loop from a pretrained base.

Iteration 0 labels the structures and rattled copies of them and fine-tunes the first committee. Iteration i >= 1:

  1. explore: committee MD from every structure over the temperature x pressure grid (``explore``);
  2. classify each frame by the committee's ``max_devi_f``: accurate (< trust_lo), candidate, failed (>= trust_hi);
     when the accurate fraction reaches ``stop.accurate_fraction`` the loop has converged and stops here;
  3. select at most ``select.max_per_iteration`` candidates, diverse (``select.method``);
  4. label them with the labeller (cached; a frame whose labelling raises or gives NaN is recorded as failed);
  5. fine-tune the K members from the base on all labels so far, and measure the committee on the test set.

Everything lands in ``out_dir``: ``iter-NNN/`` (``explore.extxyz`` with max_devi_f per frame, ``summary.json``,
``committee/member-k/``, ``committee/model``), the label cache ``labels/``, ``test.extxyz``, the final committee
``model/`` (recalibration factor fitted on half of the test set), ``learn_report.json`` and ``learn_report.png``.
Each step writes its result atomically and is skipped when present, so ``--resume`` after a kill goes on where the
run stopped and never calls the labeller again for frames already labelled.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ase import Atoms

from .config import LearnConfig, load_learn_config
from .explore import build_structures, classify, explore, labeller_md, pick, rattled
from .loop import Log, label, load_or_train_committee, read_frames, test_metrics, write_frames, write_json


def prepare_out_dir(config: LearnConfig, resume: bool, overwrite: bool) -> Path:
    """``out_dir``, emptied with ``overwrite``; an existing run without ``resume`` or ``overwrite`` is an error."""
    from ..recipe import to_dict
    out = Path(config.out_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / "recipe.json").is_file() and not resume:
        raise ValueError(f"{out} holds a learn run already; pass --resume to continue it or --overwrite to start "
                         "again (or choose another out_dir)")
    write_json(out / "recipe.json", to_dict(config))
    return out


def ensure_base(config: LearnConfig, teacher, structures: list[Atoms], out: Path, log: Log) -> tuple:
    """(the base model's directory or Hub id, its training data directory or None): ``base.model``, or
    ``out/base/model`` trained from scratch on labeller data (cached in ``out/labels``, reused on resume)."""
    if config.base.build is None:
        return config.base.model, None
    from ..distill.label_cache import build_label_cache
    from ..distill.structures import ConfigurationSettings
    from ..train.config import TrainConfig
    from ..train.loop import run
    b = config.base.build
    model_dir = out / "base" / "model"
    seeds = build_structures(b.structures, "base.build.structures") if b.structures else structures
    settings = ConfigurationSettings(temperatures=b.temperatures, md_steps=b.md_steps, md_interval=b.md_interval,
                                     rattle_copies=b.rattle_copies, rattle_stdev=b.rattle_stdev, strain_copies=0,
                                     seed=config.seed)
    data = build_label_cache(teacher, seeds, settings, out / "labels", hvp_vectors=0, seed=config.seed,
                             stress=False, r_max=6.0, log=None)
    if (model_dir / "config.json").is_file():
        return str(model_dir), str(data)
    log(f"base: training a {b.preset} model from scratch on {data} ({b.max_steps} steps)")
    t = TrainConfig.from_dict({
        "out_dir": str(out / "base"), "seed": config.seed, "max_steps": b.max_steps, "log_every": 50,
        "valid_every": b.max_steps, "checkpoint_every": max(b.max_steps // 3, 1), "progress": False,
        "data": {"train": [str(data)], "valid_fraction": 0.0, "max_atoms": config.data.max_atoms},
        "model": {"preset": b.preset, "overrides": b.overrides}, "optim": {"lr": b.lr},
        "engine": {"precision": "fp32"}})
    run(t, resume=(out / "base" / "checkpoints").is_dir())
    return str(model_dir), str(data)


def resolve_replay(config: LearnConfig, base, base_data: str | None, log: Log) -> LearnConfig:
    """With ``replay``: a copy of ``config`` whose ``replay.data`` is set (empty: the built base's own training
    data ``base_data``), after checking, before any MD, that ``committee.head`` is a new head of ``base`` and
    that every replay path exists (ValueError / FileNotFoundError)."""
    import dataclasses
    r = config.replay
    if r is None:
        return config
    if config.committee.head in base.config.heads:
        raise ValueError(f"recipe key 'committee.head' ({config.committee.head!r}) is already a head of the base "
                         f"model (heads {base.config.heads}); replay trains a new head on the labels: name another")
    data = list(r.data) or [base_data]
    missing = [d for d in data if not (Path(d).exists() or Path(d.partition("@")[0]).exists())]   # FILE@INDEX
    if missing:
        raise FileNotFoundError(f"replay.data {missing} not found; give dataset directories or ASE-readable files "
                                "of the base's pretraining data")
    base_head = config.base.head or base.config.heads[0]
    log(f"replay: head {config.committee.head!r} learns the labels, head {base_head!r} replays "
        f"{r.samples or 'all'} structures of {data} (weight {r.weight:g})")
    return dataclasses.replace(config, replay=dataclasses.replace(r, data=data))


def check_elements(base, structures: list[Atoms], source: str) -> None:
    """A base that lacks an element of the structures cannot explore them: ValueError before any MD."""
    have = set(base.config.elements)
    missing = sorted({s for a in structures for s in a.get_chemical_symbols()} - have)
    if missing:
        raise ValueError(f"base model {source} does not know elements {missing} of the recipe's structures (it has "
                         f"{sorted(have)}); fine-tune it on data with them first (foundation finetune, "
                         "finetune.add_elements: true) or choose a base that has them")


def test_set(config: LearnConfig, teacher, structures: list[Atoms], out: Path, log: Log) -> list[Atoms]:
    """Held-out labelled frames (``test.files`` + labeller MD), cached in ``out/test.extxyz``."""
    from ..data.readers import read_atoms
    path = out / "test.extxyz"
    if path.is_file():
        return read_frames(path)
    frames = [a for f in config.test.files for a in read_atoms(f)]
    if config.test.md_frames:
        t0 = time.perf_counter()
        frames += labeller_md(structures, teacher.calculator, config.test.temperatures, config.test.md_frames,
                              config.test.md_interval, seed=config.seed + 12345)
        log(f"test set: {config.test.md_frames} labeller MD frames in {time.perf_counter() - t0:.1f} s")
    write_frames(path, frames)
    return frames


def explored(config: LearnConfig, committee, structures, directory: Path, seed: int, log: Log) -> tuple:
    """The exploration frames of an iteration (run once, then read back) and its wall time (s)."""
    from ..calculator import FoundationCalculator
    path, meta = directory / "explore.extxyz", directory / "explore.json"
    if path.is_file() and meta.is_file():
        return read_frames(path), json.loads(meta.read_text())["seconds"]
    t0 = time.perf_counter()
    calc = FoundationCalculator(committee, head=config.head, dtype="float32")
    frames = explore(structures, calc, config.explore, seed, log)
    seconds = time.perf_counter() - t0
    write_frames(path, frames)
    write_json(meta, {"seconds": seconds})
    return frames, seconds


def auto_trust_lo(config: LearnConfig, committee, out: Path, i: int) -> float:
    """``trust_lo: auto``: the ``select.trust_lo_quantile`` quantile of ``committee``'s max_devi_f (eV/Å) over
    the frames picked for labelling in iterations 0 .. i-1 (``iter-NNN/picked.extxyz``), capped just below
    ``trust_hi``."""
    import numpy as np

    from .. import keys
    from ..calculator import FoundationCalculator
    paths = [out / f"iter-{j:03d}" / "picked.extxyz" for j in range(i)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"trust_lo: auto needs the frames labelled before iteration {i}, but {missing} "
                                "are missing (a run started before picked.extxyz was written); set a number")
    frames = [a for p in paths for a in read_frames(p)]
    calc = FoundationCalculator(committee, head=config.head, dtype="float32")
    devi = [res[keys.MAX_DEVI_F] for res in calc.calculate_many(frames, max_atoms=1024)]
    q = float(np.quantile(devi, config.select.trust_lo_quantile))
    return min(q, float(np.nextafter(config.select.trust_hi, 0.0)))


def iteration(config, i, committee, teacher, structures, datasets, base_dir, test, out, log) -> tuple:
    """Run (or finish) iteration ``i``; returns (its report row, the new committee or None, datasets)."""
    directory = out / f"iter-{i:03d}"
    row: dict = {"iteration": i}
    if i == 0:
        frames = rattled(structures, config.init.rattle_copies, config.init.rattle_stdev, config.seed)
        picks = list(range(len(frames)))
    else:
        frames, row["exploration_s"] = explored(config, committee, structures, directory,
                                                config.seed * 100 + i, log)
        trust_lo = config.select.trust_lo
        if trust_lo == "auto":
            trust_lo = auto_trust_lo(config, committee, out, i)
            log(f"iteration {i}: trust_lo auto = {trust_lo:.4g} eV/Å (quantile {config.select.trust_lo_quantile:g} "
                "of the committee's max_devi_f on its labelled frames)")
        row["trust_lo"] = float(trust_lo)
        groups = classify(frames, trust_lo, config.select.trust_hi)
        n = max(len(frames), 1)
        for name in ("accurate", "candidate", "failed"):
            row[name] = len(groups[name])
            row[f"{name}_fraction"] = len(groups[name]) / n
        row["explored"] = len(frames)
        row["converged"] = len(frames) > 0 and row["accurate_fraction"] >= config.stop.accurate_fraction
        if row["converged"]:
            return row, None, datasets
        picks = pick(frames, groups["candidate"], config.select.max_per_iteration, config.select.method,
                     float(committee.config.r_max))
    write_frames(directory / "picked.extxyz", [frames[p] for p in picks])   # for trust_lo: auto
    labels = label(config, teacher, [frames[p] for p in picks], out / "labels", log)
    datasets = datasets + ([labels["dataset"]] if labels["dataset"] else [])
    row.update(selected=len(picks), labels_added=labels["labelled"], failed_to_label=labels["failed"],
               labelling_s=labels["seconds"], labels_total=_count(datasets))
    if not datasets:
        raise ValueError("no frame could be labelled in iteration 0, so there is nothing to train on; check the "
                         f"labeller {config.labeller} (errors: {labels['failed'][:3]})")
    if labels["labelled"] == 0 and committee is not None:
        row["training_s"] = 0.0
        return _with_test(row, committee, test, config.head), committee, datasets
    committee, row["training_s"] = load_or_train_committee(config, base_dir, datasets, directory / "committee", log)
    return _with_test(row, committee, test, config.head), committee, datasets


def _with_test(row: dict, committee, test: list[Atoms], head: str | None) -> dict:
    if test:
        row["test"] = test_metrics(committee, test, head=head)
    return row


def _count(datasets: list[str]) -> int:
    from ..data.manifest import read_manifest
    return sum(int(read_manifest(d)["num_structures"]) for d in datasets)


def learn(config: LearnConfig, resume: bool = False, overwrite: bool = False, log: Log = print) -> dict:
    """Run the loop (module docstring); returns the report (also ``out_dir/learn_report.json``)."""
    from ..distill.teacher import load_teacher
    from ..train import outdir
    if config.threads:
        import torch
        torch.set_num_threads(config.threads)
    structures = build_structures(config.structures)
    teacher = load_teacher(config.labeller)
    out = prepare_out_dir(config, resume, overwrite)
    # one run per out_dir (an OS lock the kernel drops with the process); prepare_out_dir decided resume/overwrite
    outdir.claim(out, resume=True, verb="learn")
    try:
        return _loop(config, out, teacher, structures, log)
    finally:
        outdir.release(out)


def _loop(config: LearnConfig, out: Path, teacher, structures: list, log: Log) -> dict:
    from ..model import FoundationModel
    from .committee import CommitteeModel
    from .report import finish
    base_dir, base_data = ensure_base(config, teacher, structures, out, log)
    base = FoundationModel.from_pretrained(base_dir, revision=config.base.revision if config.base.model else None)
    check_elements(base, structures, base_dir)
    config = resolve_replay(config, base, base_data, log)
    test = test_set(config, teacher, structures, out, log)
    rows, datasets, committee = [], [], None
    for i in range(config.stop.max_iterations + 1):
        summary = out / f"iter-{i:03d}" / "summary.json"
        if summary.is_file():   # finished before a kill: read back, never recomputed
            saved = json.loads(summary.read_text())
            row, datasets = saved["row"], saved["datasets"]
            model_dir = out / f"iter-{i:03d}" / "committee" / "model"
            if model_dir.is_dir():
                committee = CommitteeModel.from_pretrained(model_dir)
        else:
            row, new, datasets = iteration(config, i, committee, teacher, structures, datasets, base_dir, test,
                                           out, log)
            committee = new or committee
            write_json(summary, {"row": row, "datasets": datasets})
        rows.append(row)
        log(_line(row))
        if row.get("converged"):
            break
    zero_shot = test_metrics(base, test, head=config.base.head) if test else None
    return finish(config, out, committee, rows, test, zero_shot, log)


def _line(row: dict) -> str:
    parts = [f"iteration {row['iteration']}"]
    if "explored" in row:
        parts.append(f"explored {row['explored']}: accurate {row['accurate_fraction']:.2f}, candidates "
                     f"{row['candidate_fraction']:.2f}, failed {row['failed_fraction']:.2f}")
    if row.get("converged"):
        parts.append("converged")
    if "labels_added" in row:
        parts.append(f"labels +{row['labels_added']} (total {row['labels_total']}, {len(row['failed_to_label'])} "
                     f"failed to label)")
    if "test" in row:
        parts.append(f"test force MAE {row['test']['force_mae_meV_per_A']:.1f} meV/Å")
    return "; ".join(parts)


def main(recipe: str, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> str:
    """``foundation learn``: load the recipe, run the loop, return a summary."""
    config = load_learn_config(recipe, overrides)
    report = learn(config, resume=resume, overwrite=overwrite)
    return (f"{len(report['iterations'])} iterations, {report['labels_total']} labels; committee in "
            f"{report['model']}; report {Path(config.out_dir) / 'learn_report.json'}")
