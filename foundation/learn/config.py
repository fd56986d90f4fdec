"""``LearnConfig``: a ``foundation learn`` recipe = the training keys of every committee member's fine-tune (at the
top, as in every recipe: ``max_steps``, ``optim``, ``loss``, ``data.max_atoms`` ...) plus the loop's sections.

- ``base``: the pretrained model (a directory, or a Hub id at a pinned ``revision``), or ``build:`` a small one
  from scratch on labeller data (``BaseBuild``).
- ``structures``: the user's starting structures: ASE-readable files (every frame) or ``{bulk: Cu, a: 3.6,
  cubic: true, repeat: [2, 2, 1], substitute: {Au: 0.5}, seed: 0}`` (``ase.build.bulk`` arguments, a supercell
  and a seeded random substitution of that fraction of the atoms).
- ``labeller``: any ASE calculator: ``{calculator: emt | gfn2-xtb | pyscf | sevennet-0 | module:ClassOrFactory,
  kwargs: {...}}`` (the distillation teacher code labels and caches).
- ``committee``: size K (>= 2), how members differ (seed, data order, ``head_init``) and, with ``replay``, the
  ``head`` the labels train (default ``learn``).
- ``replay``: optional (``foundation.finetune``'s ``ReplaySection``): every member fine-tunes with strategy replay,
  a new head ``committee.head`` on the labels and the base head on a replay sample of the base's data
  (``replay.data``; a base built by ``base.build`` replays its own training data when ``replay.data`` is empty).
- ``init``: rattled copies of the structures labelled before the first committee is trained.
- ``explore``: ASE MD (nvt: Langevin; npt: isotropic MTK) over ``temperatures`` x ``pressures`` from every structure.
- ``select``: ``trust_lo <= max_devi_f < trust_hi`` (eV/Å) are candidates, at most ``max_per_iteration`` picked
  (``farthest``: farthest-point in a pair-distance descriptor; ``time``: evenly in time order). ``trust_lo:
  auto`` takes the ``trust_lo_quantile`` quantile of the committee's max_devi_f on its own labelled frames.
- ``stop``: when the accurate fraction of an exploration reaches ``accurate_fraction``, or after ``max_iterations``.
- ``test``: held-out labelled ``files``, and/or ``md_frames`` frames of labeller MD from the structures.
- ``threads``: torch CPU threads for the whole run (None: torch's default). Small models run fastest on 1 thread,
  above all on a loaded machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..card import is_repo_id
from ..finetune.config import ReplaySection
from ..recipe import check, load_recipe
from ..train.config import TrainConfig


@dataclass
class BaseBuild:
    """A base trained from scratch on labeller data: the ``structures`` (as the top-level key), their
    ``rattle_copies`` copies (``rattle_stdev`` Å) and labeller Langevin MD frames (``md_steps`` at each of
    ``temperatures`` K, one frame every ``md_interval``), model ``preset`` + ``overrides``, ``max_steps`` at ``lr``."""
    structures: list[Any] = field(default_factory=list)
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    rattle_copies: int = 4
    rattle_stdev: float = 0.05
    temperatures: list[float] = field(default_factory=lambda: [300.0])
    md_steps: int = 100
    md_interval: int = 10
    max_steps: int = 300
    lr: float = 0.01


@dataclass
class LearnBaseSection:
    """``model``: a saved directory or a Hub id ``namespace/name`` pinned to ``revision``; or ``build``."""
    model: str = ""
    revision: str | None = None
    head: str | None = None
    build: BaseBuild | None = None


@dataclass
class CommitteeSection:
    """``size`` K full models fine-tuned from the base with seeds seed*1000 + k (data order, and the readout when
    ``head_init: random``: a fresh readout per member, so members disagree away from the labels). ``head``: with
    ``replay``, the name of the new head the labels train (default ``learn``; the base head keeps the replay data);
    exploration, selection, the test metrics and the saved committee use it. Without ``replay`` the members
    fine-tune the base head in place and ``head`` must stay empty."""
    size: int = 4
    head_init: Literal["copy", "random"] = "random"
    head: str | None = None


@dataclass
class InitSection:
    """The first labels: the structures and ``rattle_copies`` rattled copies of each (``rattle_stdev`` Å)."""
    rattle_copies: int = 2
    rattle_stdev: float = 0.05


@dataclass
class ExploreSection:
    """One MD run per (structure, temperature K, pressure GPa): ``steps`` of ``timestep`` fs, a frame every
    ``interval`` steps; a run stops early when two atoms come closer than ``min_distance`` Å."""
    ensemble: Literal["nvt", "npt"] = "nvt"
    temperatures: list[float] = field(default_factory=lambda: [300.0])
    pressures: list[float] = field(default_factory=lambda: [0.0])
    steps: int = 200
    interval: int = 10
    timestep: float = 2.0
    friction: float = 0.02
    min_distance: float = 0.5


@dataclass
class SelectSection:
    """Candidates: ``trust_lo <= max_devi_f < trust_hi`` (eV/Å); below: accurate, at or above: failed (never
    labelled). At most ``max_per_iteration`` candidates are labelled, picked by ``method``. ``trust_lo: auto``:
    each iteration sets it to the ``trust_lo_quantile`` quantile of the committee's own ``max_devi_f`` over the
    frames picked for labelling so far (its training frames), so "accurate" means "no less certain than on
    the labelled data"."""
    trust_lo: float | Literal["auto"] = 0.05
    trust_hi: float = 0.35
    max_per_iteration: int = 16
    method: Literal["farthest", "time"] = "farthest"
    trust_lo_quantile: float = 0.9


@dataclass
class StopSection:
    """Stop when an exploration's accurate fraction >= ``accurate_fraction``, or after ``max_iterations``."""
    accurate_fraction: float = 0.95
    max_iterations: int = 3


@dataclass
class TestSection:
    """Held-out test data: labelled ``files`` and/or ``md_frames`` frames of labeller Langevin MD from the
    structures (``temperatures`` K, a frame every ``md_interval`` steps). Half of it (every other frame) fits the
    final committee's recalibration factor, the other half reports calibration."""
    files: list[str] = field(default_factory=list)
    md_frames: int = 0
    temperatures: list[float] = field(default_factory=lambda: [300.0, 600.0])
    md_interval: int = 20


@dataclass
class LearnConfig(TrainConfig):
    """A ``TrainConfig`` (each member's fine-tune) plus the loop's sections (module docstring)."""
    out_dir: str = "runs/learn"
    valid_every: int = 1000
    threads: int | None = None
    base: LearnBaseSection = field(default_factory=LearnBaseSection)
    structures: list[Any] = field(default_factory=list)
    labeller: dict[str, Any] = field(default_factory=dict)
    committee: CommitteeSection = field(default_factory=CommitteeSection)
    init: InitSection = field(default_factory=InitSection)
    explore: ExploreSection = field(default_factory=ExploreSection)
    select: SelectSection = field(default_factory=SelectSection)
    stop: StopSection = field(default_factory=StopSection)
    test: TestSection = field(default_factory=TestSection)
    replay: ReplaySection | None = None

    @property
    def head(self) -> str | None:
        """The head the labels train and the loop uses: ``committee.head`` with replay, else ``base.head``
        (None: the base's first head)."""
        return self.committee.head if self.replay is not None else self.base.head

    @classmethod
    def from_dict(cls, values: dict) -> LearnConfig:
        values = dict(values or {})
        check("train" not in (values.get("data") or {}), "data.train",
              "is set by the loop (the labels gathered so far); remove it")
        check("model" not in values, "model", "is not used by learn: the architecture comes from base.model "
              "(or base.build.preset); remove the model: section")
        return super().from_dict(values)

    def validate(self) -> LearnConfig:
        """Ranges and consistency, before anything runs (ValueError naming the key)."""
        super().validate()
        s, b = self.select, self.base
        check(s.trust_hi > 0, "select.trust_hi", "must be > 0 eV/Å")
        if s.trust_lo != "auto":
            check(s.trust_lo < s.trust_hi, "select.trust_lo", f"({s.trust_lo}) must be below select.trust_hi "
                  f"({s.trust_hi}): frames with trust_lo <= max_devi_f < trust_hi (eV/Å) are labelled")
            check(s.trust_lo >= 0, "select.trust_lo", "must be >= 0 eV/Å (or auto)")
        check(0 < s.trust_lo_quantile <= 1, "select.trust_lo_quantile", f"is {s.trust_lo_quantile}; must be in "
              "(0, 1]: the quantile of the committee's max_devi_f on its labelled frames that trust_lo: auto takes")
        check(s.max_per_iteration >= 1, "select.max_per_iteration", "must be >= 1")
        check(self.committee.size >= 2, "committee.size", f"is {self.committee.size}: a committee of one model has "
              "no spread, so no uncertainty; use 2 or more members (4 is usual)")
        check(bool(b.model) != (b.build is not None), "base", "needs exactly one of base.model (a directory or Hub "
              "id) and base.build (train a small base from scratch on labeller data)")
        if b.model and not Path(b.model).exists() and is_repo_id(b.model):
            check(b.revision is not None, "base.revision", f"must pin Hub model {b.model!r} to a commit or tag")
        check(bool(self.structures), "structures", "is empty: give ASE-readable files or {bulk: ...} entries")
        check(bool(self.labeller), "labeller", "is required, e.g. {calculator: emt} or {calculator: gfn2-xtb}")
        e = self.explore
        check(bool(e.temperatures) and all(t > 0 for t in e.temperatures), "explore.temperatures", "must be > 0 K")
        check(bool(e.pressures), "explore.pressures", "needs at least one pressure (GPa; nvt uses none)")
        check(e.steps >= e.interval >= 1, "explore.steps", "must be >= explore.interval >= 1")
        check(e.timestep > 0, "explore.timestep", "must be > 0 fs")
        check(self.stop.max_iterations >= 1, "stop.max_iterations", "must be >= 1")
        check(0 < self.stop.accurate_fraction <= 1, "stop.accurate_fraction", "must be in (0, 1]")
        check(self.init.rattle_copies >= 0, "init.rattle_copies", "must be >= 0")
        check(self.test.md_frames >= 0, "test.md_frames", "must be >= 0")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 (or null: torch's default)")
        return self._validate_replay()

    def _validate_replay(self) -> LearnConfig:
        """``replay`` and ``committee.head`` (the base head's name is checked again once the base is loaded)."""
        r, c = self.replay, self.committee
        if r is None:
            check(not c.head, "committee.head", f"({c.head!r}) names the new head of replay fine-tuning; without a "
                  "replay: section the members fine-tune the base head in place: add replay: or remove it")
            return self
        c.head = c.head or "learn"
        check(bool(r.data) or self.base.build is not None, "replay.data", "is empty: give the base's pretraining "
              "data (dataset directories or ASE-readable files) to replay; only a base built by base.build replays "
              "its own training data by default")
        check(c.head != self.base.head, "committee.head", f"({c.head!r}) is the base head: replay trains a new "
              "head on the labels beside the base head; name it differently (e.g. committee.head: learn)")
        r.validate()
        return self


def load_learn_config(path: str | Path, overrides: list[str] | None = None) -> LearnConfig:
    """Read a ``foundation learn`` recipe, apply ``--set`` overrides, validate (FileNotFoundError / ValueError)."""
    return load_recipe(LearnConfig, path, overrides)
