"""``DistillConfig``: the whole description of a distillation run (``foundation distill RECIPE.yaml``).

A ``TrainConfig`` (the training keys at the top level, as in every recipe: ``max_steps``, ``optim``, ``loss``,
``data.max_atoms`` ...; ``data.train`` is filled by the run) whose ``model:`` section is the student (preset
``student`` by default), plus these sections (strict: an unknown key is an error naming the nearest valid one):

- ``teacher``: a teacher spec for ``load_teacher`` (``{model: DIR_OR_HUB_ID, revision: ...}`` or
  ``{calculator: module:Class, kwargs: {...}}``).
- ``seeds``: ASE-readable ``files`` (their labels, if any, are the ground truth), ``builtin`` structures used
  when none of the files exist, ``max_structures`` (evenly spaced), and ``reference`` files with reference
  (e.g. DFT) labels for the report.
- ``configurations``: ``ConfigurationSettings`` (teacher MD temperatures, rattled and strained copies).
- ``labels``: Hessian-vector products per structure (and when to stop matching them), stress, label cache.
- ``ground_truth``: train on the seeds' own labels too (``weight`` per structure relative to teacher labels).
- ``onpolicy``: rounds of student MD -> frames where student and teacher disagree most -> teacher labels.
- ``report``: speed, error and NVE-stability measurements after training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..recipe import check, load_recipe, suggest
from ..train.config import ModelSection, TrainConfig
from .seeds import BUILTIN_SEEDS
from .structures import ConfigurationSettings

_GT_PROPERTIES = ("energy", "forces", "stress")


@dataclass
class SeedsSection:
    """Seed structures: the first existing of ``files`` (all of them that exist, read whole), else ``builtin``.
    ``max_structures`` keeps that many, evenly spaced (None = all). ``reference``: labelled test structures."""
    files: list[str] = field(default_factory=list)
    builtin: str | None = None
    max_structures: int | None = None
    reference: list[str] = field(default_factory=list)
    max_reference: int | None = None


@dataclass
class LabelsSection:
    """Teacher labels: ``hvp_vectors`` random unit vectors per structure (H v labels), ``stress`` for periodic
    cells, cached in ``cache_dir`` (a second run with the same inputs reuses them). ``hvp_off_at_force_mae``
    (eV/Å): once a validation's force MAE (all datasets) is at or below it, the ``hvp`` loss term is switched off
    for the rest of the run (kept in checkpoints and in later on-policy stages); None = never."""
    hvp_vectors: int = 2
    hvp_off_at_force_mae: float | None = None
    stress: bool = True
    cache_dir: str = "runs/distill_cache"
    shard_size: int = 256
    seed: int = 0


@dataclass
class GroundTruthSection:
    """The seeds' own labels (when the files have them) as a second training set, weight ``weight`` (0 = off);
    ``properties``: which of energy/forces/stress to keep (drop energy when its zero differs from the teacher's)."""
    weight: float = 1.0
    properties: list[str] = field(default_factory=lambda: list(_GT_PROPERTIES))


@dataclass
class OnPolicySection:
    """``rounds`` of: student Langevin MD (``md_steps``, frame every ``interval``) at ``temperature`` K from
    ``seeds`` evenly spaced seeds, the ``pick`` frames with the largest student-teacher force disagreement
    (``metric`` max | rms) labelled by the teacher, then ``steps`` more optimizer steps on all data."""
    rounds: int = 0
    temperature: float = 300.0
    md_steps: int = 100
    interval: int = 10
    timestep: float = 1.0
    friction: float = 0.02
    seeds: int = 2
    pick: int = 8
    metric: Literal["max", "rms"] = "max"
    steps: int = 100


@dataclass
class ReportSection:
    """Speed: ``speed_steps`` NVE steps of teacher and student on the same structure (``speed_supercell`` copies
    of the first periodic seed along each axis), alternated ``speed_repeats`` times; the best of each is
    reported. NVE stability: ``nve_steps`` student steps at ``nve_temperature`` K, ``timestep`` fs."""
    dtype: Literal["float32", "float64"] = "float32"
    speed_steps: int = 20
    speed_repeats: int = 2
    speed_supercell: list[int] = field(default_factory=lambda: [1, 1, 1])
    nve_steps: int = 200
    nve_temperature: float = 300.0
    timestep: float = 1.0
    max_atoms: int = 512


@dataclass
class DistillConfig(TrainConfig):
    """A ``TrainConfig`` whose ``model`` is the student, plus the teacher, structures, labels and report."""
    out_dir: str = "runs/distill"
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="student"))
    name: str | None = None
    teacher: dict[str, Any] = field(default_factory=dict)
    seeds: SeedsSection = field(default_factory=SeedsSection)
    configurations: dict[str, Any] = field(default_factory=dict)
    labels: LabelsSection = field(default_factory=LabelsSection)
    ground_truth: GroundTruthSection = field(default_factory=GroundTruthSection)
    onpolicy: OnPolicySection = field(default_factory=OnPolicySection)
    report: ReportSection = field(default_factory=ReportSection)

    @classmethod
    def from_dict(cls, values: dict) -> DistillConfig:
        """A validated config from a nested dict; ``data.train`` and ``loss.dataset_weights`` are set by the run."""
        values = dict(values or {})
        check("train" not in (values.get("data") or {}), "data.train",
              "is set by the distillation run (teacher labels); remove it")
        check((values.get("loss") or {}).get("dataset_weights") is None, "loss.dataset_weights",
              "is set by the distillation run (teacher labels 1, ground truth ground_truth.weight); remove it")
        return super().from_dict(values)

    def settings(self) -> ConfigurationSettings:
        """The ``configurations`` section as ``ConfigurationSettings`` (unknown keys: nearest valid key named)."""
        known = list(ConfigurationSettings.__dataclass_fields__)
        for k in self.configurations:
            check(k in known, f"configurations.{k}", "is not a configuration setting" + suggest(k, known))
        return ConfigurationSettings.from_dict({"seed": self.seed, **self.configurations})

    def validate(self) -> DistillConfig:
        """Check ranges and consistency; returns self. Raises ``ValueError`` naming the key."""
        super().validate()
        check(bool(self.teacher), "teacher", "is required: {model: DIR_OR_HUB_ID} or {calculator: module:Class, "
               "kwargs: {...}}")
        check(bool(self.seeds.files) or self.seeds.builtin is not None, "seeds",
               f"needs files or builtin (one of {BUILTIN_SEEDS})")
        check(self.seeds.builtin is None or self.seeds.builtin in BUILTIN_SEEDS, "seeds.builtin",
               f"must be one of {BUILTIN_SEEDS}")
        for name in ("max_structures", "max_reference"):
            v = getattr(self.seeds, name)
            check(v is None or v >= 1, f"seeds.{name}", "must be >= 1 (or null for all)")
        check(self.labels.hvp_vectors >= 0, "labels.hvp_vectors", "must be >= 0")
        check(self.ground_truth.weight >= 0, "ground_truth.weight", "must be >= 0 (0 = teacher labels only)")
        for p in self.ground_truth.properties:
            check(p in _GT_PROPERTIES, f"ground_truth.properties.{p}", "is not a label" + suggest(p, _GT_PROPERTIES))
        o = self.onpolicy
        check(o.rounds >= 0 and o.steps >= 1 and o.pick >= 1 and o.seeds >= 1, "onpolicy",
               "needs rounds >= 0, steps >= 1, pick >= 1, seeds >= 1")
        check(o.md_steps >= o.interval >= 1, "onpolicy.md_steps", "must be >= onpolicy.interval >= 1")
        r = self.report
        check(r.speed_steps >= 1 and r.speed_repeats >= 1 and r.nve_steps >= 0, "report",
               "needs speed_steps >= 1, speed_repeats >= 1, nve_steps >= 0")
        check(len(r.speed_supercell) == 3 and min(r.speed_supercell) >= 1, "report.speed_supercell",
               "must be three integers >= 1, e.g. [2, 2, 2]")
        hvp = self.loss.coefficients.get("hvp", 0.0)
        check(hvp == 0 or self.labels.hvp_vectors > 0, "loss.coefficients.hvp",
              "needs labels.hvp_vectors > 0 (no H v labels would be made)")
        limit = self.labels.hvp_off_at_force_mae
        check(limit is None or limit >= 0, "labels.hvp_off_at_force_mae",
              "must be >= 0 eV/Å (or null: never switch the hvp term off)")
        self.settings()
        return self


def distill_config_from_dict(values: dict) -> DistillConfig:
    """A validated ``DistillConfig`` from a nested dict (as read from YAML)."""
    return DistillConfig.from_dict(values)


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    """Read a distillation recipe, apply ``--set`` overrides (``--set max_steps=50``), validate."""
    return load_recipe(DistillConfig, path, overrides)
