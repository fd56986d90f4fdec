"""``FinetuneConfig``: a fine-tuning recipe = a ``TrainConfig`` (same keys, same place, same validation) plus the
sections ``base:``, ``finetune:``, ``lora:`` and ``replay:``.

Options that could not take effect are errors, never silently ignored: a ``lora:`` section without
``finetune.strategy: lora``, ``replay:`` without ``strategy: replay`` (and replay without replay data), a
``model:`` section (the architecture comes from the base model), ``data.heads``/``data.weights`` (set from
``finetune.head`` and ``replay.weight``), a Hub id without a pinned ``base.revision``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..card import is_repo_id
from ..recipe import check, load_recipe
from ..train.config import TrainConfig

STRATEGIES = ("full", "frozen", "lora", "replay")
E0_FITS = ("residual", "total", "keep")


@dataclass
class BaseSection:
    """The pretrained model: a saved directory or a Hub id ``namespace/name`` pinned to ``revision`` (commit
    sha, tag or branch); ``head``: the base head whose weights start the fine-tuning (default: the first)."""
    model: str = ""
    revision: str | None = None
    head: str | None = None


@dataclass
class FinetuneSection:
    """strategy: full (all weights), frozen (heads only), lora (adapters on the backbone's linear maps + heads),
    replay (new head on the new data + the base head on a replay sample of the pretraining data).
    head: name of a new head for the new data (required for replay; default: fine-tune the base head in place).
    head_init: copy (new head starts as the base head: step 0 = base model) or random (a fresh head).
    e0: residual (E0 += least-squares fit of label - base prediction), total (fit of total energies), keep,
        or explicit values {symbol: eV} (e.g. isolated-atom energies at the new level of theory; others kept).
    add_elements: allow elements of the new data the base model never saw (embedding rows added).
    cache_dir: where ASE-readable input files are converted to shards (default ``out_dir/data``).
    monitor: pretraining validation data evaluated on the base head before and after (forgetting).
    long_range: add a long-range charge head (settings as ``ModelConfig.long_range``, e.g. {kind: coulomb}) to a
        base without one; it starts with zero output (neutral structures: step 0 = the base).
    """
    strategy: Literal["full", "frozen", "lora", "replay"] = "full"
    head: str | None = None
    head_init: Literal["copy", "random"] = "copy"
    e0: Literal["residual", "total", "keep"] | dict[str, float] = "residual"
    add_elements: bool = True
    cache_dir: str | None = None
    monitor: list[str] = field(default_factory=list)
    long_range: dict[str, Any] | None = None


@dataclass
class LoraSection:
    """Low-rank adapters W + (alpha / rank) A B on every 2-D linear map of the backbone, merged on export."""
    rank: int = 8
    alpha: float = 16.0


@dataclass
class ReplaySection:
    """Pretraining data mixed into training on the base head: ``data`` (dirs or files), a seeded sample of
    ``samples`` structures (0 = all), mixing weight ``weight`` (fraction of sampled structures), ``valid``
    (pretraining validation data: monitored before/after fine-tuning)."""
    data: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    samples: int = 0
    weight: float = 0.2

    def validate(self) -> None:
        """``weight`` in (0, 1) and ``samples`` >= 0 (ValueError naming the key)."""
        check(0.0 < self.weight < 1.0, "replay.weight", f"is the fraction of replayed structures, in (0, 1); got "
              f"{self.weight}")
        check(self.samples >= 0, "replay.samples", "must be >= 0 (0 = all structures)")


@dataclass
class FinetuneConfig(TrainConfig):
    """A ``TrainConfig`` (the training keys) plus the base model and how to fine-tune it. The ``model:`` section
    is not used: the architecture comes from ``base.model``."""
    out_dir: str = "runs/finetune"
    base: BaseSection = field(default_factory=BaseSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoraSection | None = None
    replay: ReplaySection | None = None

    @property
    def monitor(self) -> list[str]:
        """Pretraining validation data to watch for forgetting (``finetune.monitor`` or ``replay.valid``)."""
        return list(self.finetune.monitor) or (list(self.replay.valid) if self.replay else [])

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """A validated config from a nested dict; keys set by fine-tuning itself are errors naming the one to use."""
        values = dict(values or {})
        if "model" in values:
            raise ValueError("recipe key 'model' is not used in fine-tuning: the architecture comes from "
                             "base.model; remove the model: section")
        data = values.get("data") or {}
        for key, instead in (("heads", "finetune.head"), ("weights", "replay.weight")):
            if data.get(key) is not None:
                raise ValueError(f"recipe key 'data.{key}' is set by fine-tuning; use {instead} instead")
        if (values.get("loss") or {}).get("dataset_weights") is not None:
            raise ValueError("recipe key 'loss.dataset_weights' is set by fine-tuning; use replay.weight instead")
        return super().from_dict(values)

    def validate(self) -> FinetuneConfig:
        super().validate()
        return validate(self)


def finetune_config_from_dict(values: dict) -> FinetuneConfig:
    """A validated ``FinetuneConfig`` from a nested dict (as read from YAML)."""
    return FinetuneConfig.from_dict(values)


def validate(config: FinetuneConfig) -> FinetuneConfig:
    """Cross-section checks; ``ValueError`` naming the key and what to do."""
    b, f = config.base, config.finetune
    if not b.model:
        raise ValueError("recipe key 'base.model' is empty; give a saved model directory (e.g. "
                         "runs/pretrain_small/model) or a Hub id namespace/name with base.revision")
    is_dir = Path(b.model).is_dir()
    if not is_dir and is_repo_id(b.model) and not b.revision and not Path(b.model).exists():
        raise ValueError(f"base.model {b.model!r} is a Hub id: pin base.revision to a commit sha or tag so the "
                         "fine-tune is reproducible (or point base.model to a local directory)")
    if isinstance(f.e0, dict):
        from ase.data import atomic_numbers
        bad = [k for k in f.e0 if k not in atomic_numbers]
        if bad:
            raise ValueError(f"recipe key 'finetune.e0' lists unknown chemical symbols {bad}")
    if f.strategy == "lora" and config.lora is None:
        config.lora = LoraSection()
    if config.lora is not None and f.strategy != "lora":
        raise ValueError(f"recipe has a lora: section but finetune.strategy is {f.strategy!r}; set "
                         "finetune.strategy: lora or remove the lora: section")
    if config.lora is not None and (config.lora.rank < 1 or config.lora.alpha <= 0):
        raise ValueError("recipe key 'lora.rank' must be >= 1 and 'lora.alpha' > 0")
    if config.replay is not None and f.strategy != "replay":
        raise ValueError(f"recipe has a replay: section but finetune.strategy is {f.strategy!r}; set "
                         "finetune.strategy: replay or remove the replay: section")
    if f.strategy == "replay":
        if config.replay is None or not config.replay.data:
            raise ValueError("finetune.strategy is 'replay' but replay.data is empty: give the pretraining data "
                             "(dataset directories or files) to replay, or choose another strategy")
        if not f.head:
            raise ValueError("finetune.strategy 'replay' trains a new head on the new data: name it with "
                             "finetune.head (e.g. finetune.head: target)")
        config.replay.validate()
    return config


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a fine-tuning recipe YAML, apply ``--set`` overrides, validate (FileNotFoundError / ValueError)."""
    return load_recipe(FinetuneConfig, path, overrides)
