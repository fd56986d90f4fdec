"""``DistillConfig``: the whole description of a distillation run (``foundation distill RECIPE.yaml``).

Sections (YAML, strict like ``TrainConfig``: an unknown key is an error naming the nearest valid one):

- ``teacher``: a teacher spec for ``load_teacher`` (``{model: DIR_OR_HUB_ID, revision: ...}`` or
  ``{calculator: module:Class, kwargs: {...}}``).
- ``student``: ``preset`` (+ ``overrides``) or a full ``config`` (a ``ModelConfig`` dict); elements default to
  the seeds'.
- ``seeds``: ASE-readable ``files`` (their labels, if any, are the ground truth), ``builtin`` structures used
  when none of the files exist, ``max_structures`` (evenly spaced), and ``reference`` files with reference
  (e.g. DFT) labels for the report.
- ``configurations``: ``ConfigurationSettings`` (teacher MD temperatures, rattled and strained copies).
- ``labels``: Hessian-vector products per structure, stress, label cache directory.
- ``ground_truth``: train on the seeds' own labels too (``weight`` per structure relative to teacher labels).
- ``onpolicy``: rounds of student MD -> frames where student and teacher disagree most -> teacher labels.
- ``train``: a ``TrainConfig`` (``data.train`` is filled by the run; ``loss.coefficients.hvp`` and
  ``loss.hvp_off_at_force_mae`` control Hessian-vector matching).
- ``report``: speed, error and NVE-stability measurements after training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config import TrainConfig, _build, _check, _suggest, apply_overrides
from .configurations import ConfigurationSettings

BUILTIN_SEEDS = ("silicon", "copper")
_GT_PROPERTIES = ("energy", "forces", "stress")


@dataclass
class StudentSection:
    """``ModelConfig.preset(preset, elements=..., **overrides)``, or ``ModelConfig.from_dict(config)``."""
    preset: str = "student"
    overrides: dict[str, Any] = field(default_factory=dict)
    config: Union[dict[str, Any], None] = None
    elements: Union[list[str], None] = None


@dataclass
class SeedsSection:
    """Seed structures: the first existing of ``files`` (all of them that exist, read whole), else ``builtin``.
    ``max_structures`` keeps that many, evenly spaced (None = all). ``reference``: labelled test structures."""
    files: list[str] = field(default_factory=list)
    builtin: Union[str, None] = None
    max_structures: Union[int, None] = None
    reference: list[str] = field(default_factory=list)
    max_reference: Union[int, None] = None


@dataclass
class LabelsSection:
    """Teacher labels: ``hvp_vectors`` random unit vectors per structure (H v labels), ``stress`` for periodic
    cells, cached in ``cache_dir`` (a second run with the same inputs reuses them)."""
    hvp_vectors: int = 2
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
class DistillConfig:
    out_dir: str = "runs/distill"
    seed: int = 0
    name: Union[str, None] = None
    teacher: dict[str, Any] = field(default_factory=dict)
    student: StudentSection = field(default_factory=StudentSection)
    seeds: SeedsSection = field(default_factory=SeedsSection)
    configurations: dict[str, Any] = field(default_factory=dict)
    labels: LabelsSection = field(default_factory=LabelsSection)
    ground_truth: GroundTruthSection = field(default_factory=GroundTruthSection)
    onpolicy: OnPolicySection = field(default_factory=OnPolicySection)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportSection = field(default_factory=ReportSection)

    def settings(self) -> ConfigurationSettings:
        """The ``configurations`` section as ``ConfigurationSettings`` (unknown keys: nearest valid key named)."""
        known = list(ConfigurationSettings.__dataclass_fields__)
        for k in self.configurations:
            _check(k in known, f"configurations.{k}", "is not a configuration setting" + _suggest(k, known))
        return ConfigurationSettings.from_dict({"seed": self.seed, **self.configurations})

    def validate(self) -> "DistillConfig":
        """Check ranges and consistency; returns self. Raises ``ValueError`` naming the key."""
        _check(bool(self.teacher), "teacher", "is required: {model: DIR_OR_HUB_ID} or {calculator: module:Class, "
               "kwargs: {...}}")
        _check(bool(self.seeds.files) or self.seeds.builtin is not None, "seeds",
               f"needs files or builtin (one of {BUILTIN_SEEDS})")
        _check(self.seeds.builtin is None or self.seeds.builtin in BUILTIN_SEEDS, "seeds.builtin",
               f"must be one of {BUILTIN_SEEDS}")
        for name in ("max_structures", "max_reference"):
            v = getattr(self.seeds, name)
            _check(v is None or v >= 1, f"seeds.{name}", "must be >= 1 (or null for all)")
        _check(self.labels.hvp_vectors >= 0, "labels.hvp_vectors", "must be >= 0")
        _check(self.ground_truth.weight >= 0, "ground_truth.weight", "must be >= 0 (0 = teacher labels only)")
        for p in self.ground_truth.properties:
            _check(p in _GT_PROPERTIES, f"ground_truth.properties.{p}", "is not a label" + _suggest(p, _GT_PROPERTIES))
        o = self.onpolicy
        _check(o.rounds >= 0 and o.steps >= 1 and o.pick >= 1 and o.seeds >= 1, "onpolicy",
               "needs rounds >= 0, steps >= 1, pick >= 1, seeds >= 1")
        _check(o.md_steps >= o.interval >= 1, "onpolicy.md_steps", "must be >= onpolicy.interval >= 1")
        r = self.report
        _check(r.speed_steps >= 1 and r.speed_repeats >= 1 and r.nve_steps >= 0, "report",
               "needs speed_steps >= 1, speed_repeats >= 1, nve_steps >= 0")
        _check(len(r.speed_supercell) == 3 and min(r.speed_supercell) >= 1, "report.speed_supercell",
               "must be three integers >= 1, e.g. [2, 2, 2]")
        hvp = self.train.loss.coefficients.get("hvp", 0.0)
        _check(hvp == 0 or self.labels.hvp_vectors > 0, "train.loss.coefficients.hvp",
               "needs labels.hvp_vectors > 0 (no H v labels would be made)")
        self.settings()
        return self


def distill_config_from_dict(values: dict) -> DistillConfig:
    """A validated ``DistillConfig`` from a nested dict. ``train.data.train`` is filled by the run: give it a
    placeholder-free recipe (``train.data`` may set ``max_atoms``, ``valid_fraction`` etc.)."""
    values = dict(values or {})
    train = dict(values.get("train") or {})
    data = dict(train.get("data") or {})
    _check("train" not in data, "train.data.train", "is set by the distillation run (teacher labels); remove it")
    train["data"] = data
    values["train"] = train
    config = _build(DistillConfig, values)
    return config.validate()


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    """Read a distillation recipe, apply ``--set`` overrides (``--set train.max_steps=50``), validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} not found; distillation recipes ship in recipes/distill_*.yaml")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {str(path)!r} must be a YAML mapping of sections (teacher:, student:, seeds: ...)")
    try:
        return distill_config_from_dict(apply_overrides(values, overrides or []))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
