"""``foundation distill RECIPE.yaml``: a teacher (our model or any ASE calculator) -> a fast student.

Order of work (``distill``):
  1. the teacher (``load_teacher``) and the seed structures (files, or built-in ones when the files are absent)
  2. configurations (seeds, rattled and strained copies, teacher MD at several temperatures) labelled by the
     teacher with energy, forces, stress and H v for k random unit vectors per structure, cached in LMDB shards
     (``label_cache``: a second run with the same inputs does not call the teacher)
  3. the seeds' own (reference) labels as a second training set when they have them (``ground_truth``)
  4. the student (preset or ModelConfig; statistics from the teacher labels) trained with the DeepSpeed
     ``Trainer``: loss = energy/forces/stress + ``hvp`` (H v matching, switched off once the validation force
     MAE reaches ``train.loss.hvp_off_at_force_mae``)
  5. on-policy rounds: student MD -> frames where student and teacher forces disagree most -> teacher labels
     -> more training on everything (statistics kept: recomputing them would change the model)
  6. the report (``distill_report``): speed student vs teacher in this run on the same structure, errors vs the
     teacher (held-out teacher labels) and vs reference labels, NVE stability; printed, written as JSON and put
     in the student's model card (``save_pretrained``), which names the teacher and its revision.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms

from .. import keys
from .config import _check
from .distill_config import BUILTIN_SEEDS, DistillConfig, load_distill_config
from .loop import Trainer

Log = Callable[[str], None]


# --- seeds --------------------------------------------------------------------------------------------------
def builtin_seeds(name: str) -> list[Atoms]:
    """Built-in seed structures (no labels).

    ``silicon``: diamond Si primitive cells at a = 5.30/5.43/5.56 Å, the 8-atom cubic cell, a 64-atom supercell
    and the same with a vacancy (63 atoms). ``copper``: fcc Cu primitive cells at a = 3.50/3.61/3.72 Å, the
    4-atom cubic cell, a 32-atom supercell, the same with a vacancy, and a 4-layer (111) slab with vacuum.
    """
    from ase.build import bulk, fcc111
    if name == "silicon":
        kind, symbol, lattice, cubic_a = "diamond", "Si", (5.30, 5.43, 5.56), 5.43
    elif name == "copper":
        kind, symbol, lattice, cubic_a = "fcc", "Cu", (3.50, 3.61, 3.72), 3.61
    else:
        raise ValueError(f"unknown built-in seed set {name!r}; use one of {BUILTIN_SEEDS}")
    out = [bulk(symbol, kind, a=a) for a in lattice]
    out.append(bulk(symbol, kind, a=cubic_a, cubic=True))
    big = bulk(symbol, kind, a=cubic_a, cubic=True).repeat(2)
    vacancy = big.copy()
    del vacancy[0]
    out += [big, vacancy]
    if name == "copper":
        slab = fcc111(symbol, size=(2, 2, 4), a=cubic_a, vacuum=6.0)
        slab.pbc = True
        out.append(slab)
    return out


def evenly(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced over the list (all when ``limit`` is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[int(i)] for i in np.unique(np.round(np.linspace(0, len(items) - 1, limit)).astype(int))]


def read_structures(paths: list[str], limit: int | None, what: str) -> list[Atoms]:
    """All frames of the existing ``paths`` (ASE-readable; labels kept on ``atoms.calc``), evenly thinned."""
    from ase.io import read
    frames = []
    for p in paths:
        try:
            frames.extend(read(p, ":"))
        except Exception as exc:
            raise ValueError(f"{what} file {p!r} could not be read by ASE ({exc}); give an extxyz/db/... file") from exc
    return evenly(frames, limit)


def load_seeds(config: DistillConfig, log: Log | None) -> tuple[list[Atoms], str]:
    """(seed structures, where they came from): ``seeds.files`` that exist, else ``seeds.builtin``."""
    s = config.seeds
    present = [p for p in s.files if Path(p).is_file()]
    if present:
        seeds = read_structures(present, s.max_structures, "seed")
        source = ", ".join(present)
    elif s.builtin:
        seeds, source = evenly(builtin_seeds(s.builtin), s.max_structures), f"built-in {s.builtin}"
        if s.files and log:
            log(f"seeds: none of {s.files} exist; using the built-in {s.builtin} structures")
    else:
        raise FileNotFoundError(f"seed files {s.files} not found; fix seeds.files or set seeds.builtin")
    if not seeds:
        raise ValueError(f"no seed structures in {source}")
    return seeds, source


def plain(atoms: Atoms) -> Atoms:
    """A copy with numbers, positions, cell and pbc only."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


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
def build_student(config: DistillConfig, elements: list[str]):
    """The untrained student: ``ModelConfig.from_dict(student.config)`` or the preset with overrides."""
    from ..model import FoundationModel, ModelConfig
    st = config.student
    if st.config is not None:
        return FoundationModel(ModelConfig.from_dict({"elements": st.elements or elements, **st.config}))
    return FoundationModel(ModelConfig.preset(st.preset, elements=st.elements or elements, **st.overrides))


def train_config(config: DistillConfig, datasets: list[str], weights: list[float], out_dir: Path, max_steps: int):
    """The ``TrainConfig`` of one training stage on ``datasets`` (loss weight per dataset ``weights``)."""
    import copy
    t = copy.deepcopy(config.train)
    _check(t.loss.dataset_weights is None, "train.loss.dataset_weights",
           "is set by the distillation run (teacher labels 1, ground truth ground_truth.weight); remove it")
    t.data.train, t.loss.dataset_weights = list(datasets), list(weights)
    t.data.weights, t.data.heads = None, None
    t.out_dir, t.max_steps, t.seed = str(out_dir), int(max_steps), config.seed
    t.checkpoint_every = min(t.checkpoint_every, max_steps)
    return t.validate()


def train_stage(config: DistillConfig, model, datasets, weights, out_dir: Path, max_steps: int, first: bool,
                switched_off: dict | None = None):
    """Train ``model`` on ``datasets``; returns (the exported EMA student, validation metrics, trainer).
    ``switched_off``: loss terms already switched off in an earlier stage stay off."""
    from ..model import FoundationModel
    t = train_config(config, datasets, weights, out_dir, max_steps)
    trainer = Trainer(t, model=model, fit_statistics=first)   # later stages keep the student's E0/scale/shift
    trainer.loss.load_state_dict({"switched_off": switched_off or {}})
    metrics = trainer.fit()
    return FoundationModel.from_pretrained(out_dir / "model"), metrics, trainer


# --- on-policy rounds -----------------------------------------------------------------------------------------
def onpolicy_frames(config: DistillConfig, student, teacher, seeds: list[Atoms], round_index: int,
                    log: Log | None) -> list[Atoms]:
    """Frames of the student's own Langevin MD where its forces disagree most with the teacher's."""
    from ..calculator import FoundationCalculator
    from .configurations import md_cell, run_md_frames, select_disagreeing
    o = config.onpolicy
    calc = FoundationCalculator(student, dtype=config.report.dtype)
    frames = []
    for i, seed in enumerate(evenly(seeds, o.seeds)):
        rng = np.random.default_rng([config.seed, 101, round_index, i])
        try:
            frames += [a for _, a in run_md_frames(md_cell(seed), calc, o.temperature, o.md_steps, o.interval, o.timestep,
                                                   o.friction, rng, min_dist=0.5, label=f"student MD {i}")]
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
def distill(config: DistillConfig, log: Log | None = print) -> dict:
    """Run a distillation (module doc); returns the report (also in ``out_dir/report.json`` and the card)."""
    from ase.data import chemical_symbols

    from . import distill_report as rep
    from .label_cache import build_label_cache, label_frames
    from .teacher import load_teacher
    out, cache_dir = Path(config.out_dir), Path(config.labels.cache_dir)
    teacher = load_teacher(config.teacher)
    seeds, source = load_seeds(config, log)
    elements = [chemical_symbols[z] for z in sorted({int(z) for a in seeds for z in a.numbers})]
    student = build_student(config, elements)
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
    student, metrics, trainer = train_stage(config, student, datasets, weights, out / "train", config.train.max_steps,
                                            first=True)
    valid_sets = trainer.valid_sets
    hvp_off, done = dict(trainer.loss.switched_off), config.train.max_steps   # property -> overall step
    for r in range(1, config.onpolicy.rounds + 1):
        picks = onpolicy_frames(config, student, teacher, seeds, r, log)
        if not picks:
            continue
        datasets.append(str(label_frames(teacher, picks, cache_dir, hvp_vectors=lab.hvp_vectors, seed=lab.seed,
                                         stress=lab.stress, shard_size=lab.shard_size, r_max=r_max, log=log)))
        weights.append(1.0)
        student, metrics, trainer = train_stage(config, student, datasets, weights, out / f"round{r}",
                                                config.onpolicy.steps, first=False, switched_off=hvp_off)
        hvp_off.update({p: done + s for p, s in trainer.loss.switched_off.items() if p not in hvp_off})
        done += config.onpolicy.steps
    report = rep.build_report(config, teacher, student, seeds, source, valid_sets[:1], metrics, datasets,
                              hvp_off, log)
    rep.export(config, student, teacher, report, datasets, gt is not None, out)
    return report


def main(recipe: str, overrides: list[str] | None = None) -> str:
    """``foundation distill``: load the recipe, distill, return the printed report."""
    from .distill_report import format_report
    config = load_distill_config(recipe, overrides)
    report = distill(config)
    return format_report(report) + f"\nstudent exported to {Path(config.out_dir) / 'model'}"
