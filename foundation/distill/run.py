"""``foundation distill RECIPE.yaml``: a teacher (our model or any ASE calculator) -> a fast student.

Order of work (``distill``):

  1. the teacher (``load_teacher``) and the seed structures (files, or built-in ones when the files are absent)
  2. configurations (seeds, rattled and strained copies, teacher MD at several temperatures) labelled by the
     teacher with energy, forces, stress and H v for k random unit vectors per structure, cached in LMDB shards
     (``label_cache``: a second run with the same inputs does not call the teacher)
  3. the seeds' own (reference) labels as a second training set when they have them (``ground_truth``)
  4. the student (preset or ModelConfig; statistics from the teacher labels) trained with the DeepSpeed
     ``Trainer``: loss = energy/forces/stress + ``hvp`` (H v matching, switched off by a trainer hook once the
     validation force MAE reaches ``labels.hvp_off_at_force_mae``)
  5. on-policy rounds: student MD -> frames where student and teacher forces disagree most -> teacher labels
     -> more training on everything (statistics kept: recomputing them would change the model)
  6. the report (``report``): speed student vs teacher in this run on the same structure, errors vs the
     teacher (held-out teacher labels) and vs reference labels, NVE stability; printed, written as JSON and put
     in the student's model card (``save_pretrained``), which names the teacher and its revision.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms

from .. import keys
from ..train.config import training_keys
from ..train.loop import Trainer
from .config import DistillConfig, load_distill_config
from .seeds import evenly, load_seeds, plain

Log = Callable[[str], None]


# --- ground truth ----------------------------------------------------------------------------------------
def ground_truth_dataset(seeds: list[Atoms], properties: list[str], cache_dir: Path, r_max: float) -> Path | None:
    """The seeds' own labels (``properties`` of energy/forces/stress) as a dataset, or None when they have none."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write
    from ase.stress import full_3x3_to_voigt_6_stress

    from ..data.convert import convert
    from ..data.labels import read_labels
    from .label_cache import seeds_digest
    labelled = []
    for a in seeds:
        lab = {k: v for k, v in read_labels(a).items() if k in properties}
        if keys.FORCES in lab or keys.ENERGY in lab:
            out = plain(a)
            if keys.STRESS in lab:
                lab[keys.STRESS] = full_3x3_to_voigt_6_stress(lab[keys.STRESS])
            out.calc = SinglePointCalculator(out, **lab)
            labelled.append(out)
    if not labelled:
        return None
    tag = hashlib.sha256((seeds_digest(labelled) + json.dumps(sorted(properties))).encode()).hexdigest()[:16]
    directory = cache_dir / f"ground-truth-{tag}"
    if not (directory / "manifest.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        source = cache_dir / f"ground-truth-{tag}.extxyz"
        write(source, labelled, format="extxyz")
        convert([source], directory, r_max=r_max, dataset_name="reference labels of the seeds", progress=False,
                level_of_theory="reference labels of the seed files")
        source.unlink()
    return directory


# --- student and training -------------------------------------------------------------------------------------
def train_config(config: DistillConfig, datasets: list[str], weights: list[float], out_dir: Path, max_steps: int):
    """The ``TrainConfig`` of one training stage on ``datasets`` (loss weight per dataset ``weights``): the
    recipe's training keys, with the stage's data, output directory and length."""
    t = training_keys(config)
    t.data.train, t.loss.dataset_weights = list(datasets), list(weights)
    t.data.weights, t.data.heads = None, None
    t.out_dir, t.max_steps = str(out_dir), int(max_steps)
    t.checkpoint_every = min(t.checkpoint_every, max_steps)
    return t.validate()


def train_stage(config: DistillConfig, model, datasets, weights, out_dir: Path, max_steps: int, first: bool,
                switched_off: dict | None = None, resume: bool = False):
    """Train ``model`` on ``datasets``; returns (the exported EMA student, validation metrics, trainer).
    ``switched_off``: loss terms already switched off in an earlier stage stay off. ``resume``: continue from the
    stage's checkpoints when it has some (the terms it switched off itself are kept)."""
    from ..model import FoundationModel
    t = train_config(config, datasets, weights, out_dir, max_steps)
    trainer = Trainer(t, model=model, fit_statistics=first,   # later stages keep the student's E0/scale/shift
                      hooks=[HvpSwitch(config.labels.hvp_off_at_force_mae)], resume=resume)
    trainer.loss.load_state_dict({"switched_off": {**(switched_off or {}), **trainer.loss.switched_off}})
    metrics = trainer.fit()
    return FoundationModel.from_pretrained(out_dir / "model"), metrics, trainer


class HvpSwitch:
    """Trainer hook: switch the ``hvp`` loss term off for good once a validation's force MAE (all datasets, eV/Å)
    is at or below ``limit`` (None = never). The switch lives in the loss state, so it survives a resume."""

    def __init__(self, limit: float | None):
        self.limit = limit

    def __call__(self, trainer, metrics: dict) -> None:
        mae = (metrics.get("all/forces") or {}).get("mae")
        loss = trainer.loss
        if self.limit is None or mae is None or mae > self.limit or keys.HESSIAN_PRODUCTS not in loss.properties \
                or keys.HESSIAN_PRODUCTS in loss.switched_off:
            return
        loss.switch_off(keys.HESSIAN_PRODUCTS, trainer.step)
        if trainer.rank == 0:
            print(f"step {trainer.step}: validation force MAE {mae:.4g} eV/Å <= {self.limit:g}: loss term "
                  f"{keys.HESSIAN_PRODUCTS!r} switched off")


# --- on-policy rounds -----------------------------------------------------------------------------------------
def onpolicy_frames(config: DistillConfig, student, teacher, seeds: list[Atoms], round_index: int,
                    log: Log | None) -> list[Atoms]:
    """Frames of the student's own Langevin MD where its forces disagree most with the teacher's."""
    from ..calculator import FoundationCalculator
    from .structures import md_cell, run_md_frames, select_disagreeing
    o = config.onpolicy
    calc = FoundationCalculator(student, dtype=config.report.dtype)
    frames = []
    for i, seed in enumerate(evenly(seeds, o.seeds)):
        rng = np.random.default_rng([config.seed, 101, round_index, i])
        try:
            frames += [a for _, a in run_md_frames(md_cell(seed), calc, o.temperature, o.md_steps, o.interval,
                                                   o.timestep, o.friction, rng, min_dist=0.5,
                                                   label=f"student MD {i}")]
        except ValueError as exc:   # the student broke down: its frames so far are not kept; say so
            if log:
                log(f"on-policy round {round_index}: {exc}")
    if not frames:
        return []
    student_f = [r["forces"] for r in calc.calculate_many(frames, config.report.max_atoms)]
    teacher_f = [r[keys.FORCES] for r in teacher.label(frames, hvp_vectors=0, stress=False)]
    picks = select_disagreeing(frames, student_f, teacher_f, o.pick, o.metric)
    if log:
        log(f"on-policy round {round_index}: {len(frames)} student MD frames, picked {len(picks)} with force "
            f"disagreement {picks[-1].info['force_disagreement']:.3g}-{picks[0].info['force_disagreement']:.3g} eV/Å")
    return picks


# --- the run --------------------------------------------------------------------------------------------------
def distill(config: DistillConfig, log: Log | None = print, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a distillation (module doc); returns the report (also in ``out_dir/report.json`` and the card).
    ``resume``: every stage continues from its checkpoints (the teacher labels are cached anyway);
    ``overwrite``: an earlier run's checkpoints are deleted first; without either they are refused. ``out_dir``
    is locked against a second run meanwhile (``train.outdir``)."""
    import os

    from ..train import outdir
    rank = int(os.environ.get("RANK", "0"))
    outdir.claim(config.out_dir, rank, resume=resume, overwrite=overwrite, verb="distill")
    try:
        return _distill(config, log, resume)
    finally:
        outdir.release(config.out_dir, rank)


def _distill(config: DistillConfig, log: Log | None, resume: bool) -> dict:
    from ase.data import chemical_symbols

    from . import report as rep
    from .label_cache import build_label_cache, label_frames
    from .teacher import load_teacher
    out, cache_dir = Path(config.out_dir), Path(config.labels.cache_dir)
    teacher = load_teacher(config.teacher)
    seeds, source = load_seeds(config, log)
    elements = [chemical_symbols[z] for z in sorted({int(z) for a in seeds for z in a.numbers})]
    student = config.model.build(elements)
    r_max = float(student.config.r_max)
    lab = config.labels
    labels_dir = build_label_cache(teacher, [plain(a) for a in seeds], config.settings(), cache_dir,
                                   hvp_vectors=lab.hvp_vectors, seed=lab.seed, stress=lab.stress,
                                   shard_size=lab.shard_size, r_max=r_max, log=log)
    datasets, weights = [str(labels_dir)], [1.0]
    gt = None
    if config.ground_truth.weight > 0:
        gt = ground_truth_dataset(seeds, config.ground_truth.properties, cache_dir, r_max)
        if gt is not None:
            datasets.append(str(gt))
            weights.append(config.ground_truth.weight)
    student, metrics, trainer = train_stage(config, student, datasets, weights, out / "train", config.max_steps,
                                            first=True, resume=resume)
    valid_sets = trainer.valid_sets
    hvp_off, done = dict(trainer.loss.switched_off), config.max_steps   # property -> overall step
    for r in range(1, config.onpolicy.rounds + 1):
        picks = onpolicy_frames(config, student, teacher, seeds, r, log)
        if not picks:
            continue
        datasets.append(str(label_frames(teacher, picks, cache_dir, hvp_vectors=lab.hvp_vectors, seed=lab.seed,
                                         stress=lab.stress, shard_size=lab.shard_size, r_max=r_max, log=log)))
        weights.append(1.0)
        student, metrics, trainer = train_stage(config, student, datasets, weights, out / f"round{r}",
                                                config.onpolicy.steps, first=False, switched_off=hvp_off,
                                                resume=resume)
        hvp_off.update({p: done + s for p, s in trainer.loss.switched_off.items() if p not in hvp_off})
        done += config.onpolicy.steps
    report = rep.build_report(config, teacher, student, seeds, source, valid_sets[:1], metrics, datasets,
                              hvp_off, log)
    rep.export(config, student, teacher, report, datasets, gt is not None, out)
    return report


def main(recipe: str, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> str:
    """``foundation distill``: load the recipe, distill, return the printed report."""
    from .report import format_report
    config = load_distill_config(recipe, overrides)
    report = distill(config, resume=resume, overwrite=overwrite)
    return format_report(report) + f"\nstudent exported to {Path(config.out_dir) / 'model'}"
