"""``TrainConfig``: the whole description of a training run, as dataclasses validated on load.

A recipe is a YAML file whose keys mirror the dataclasses below, read by ``foundation.recipe`` (strict: an unknown
or misspelt key is an error naming the nearest valid one). Every job's recipe has this layout: fine-tuning and
distillation configs extend ``TrainConfig`` with sections of their own, so the training keys (``max_steps``,
``optim.lr``, ``data.max_atoms`` ...) sit in the same place with the same ``--set`` paths for every job.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import keys
from ..recipe import build, check, load_recipe, suggest, to_dict

LOSS_PROPERTIES = (keys.ENERGY, keys.FORCES, keys.STRESS, keys.CHARGES, keys.DIPOLE, keys.CHARGE_EXCESS,
                   keys.HESSIAN_PRODUCTS)


@dataclass
class DataConfig:
    """Where the structures come from and how they are batched.

    ``train``/``valid``: LMDB shard directories (``foundation data convert``) or ASE-readable files, one entry
    per dataset. ``heads``: readout head name per training dataset (default: one head, ``"default"``).
    ``weights``: mixing weights per training dataset (default: proportional to size).
    ``valid_fraction``: when ``valid`` is empty, this fraction of each training set is held out (seeded).
    ``max_atoms``: atom budget of one micro-batch on one rank.
    """
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    heads: list[str] | None = None
    weights: list[float] | None = None
    valid_fraction: float = 0.05
    max_atoms: int = 256
    num_workers: int = 0
    shuffle: bool = True


@dataclass
class ModelSection:
    """The model trained from scratch: ``ModelConfig.preset(preset, elements=..., **overrides)``, or a whole
    ``config`` (a ``ModelConfig`` dict, as in a config.json; ``preset`` and ``overrides`` then unused); elements
    default to the training data's."""
    preset: str = "small"
    elements: list[str] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def build(self, elements: list[str], heads: list[str] | None = None):
        """The untrained ``FoundationModel`` for ``elements`` (``self.elements`` when given) and ``heads``."""
        from ..model import FoundationModel, ModelConfig
        elements = self.elements or elements
        if self.config is not None:
            return FoundationModel(ModelConfig.from_dict({**self.config, "elements": elements}))
        overrides = dict(self.overrides)
        if heads:
            overrides.setdefault("heads", heads)
        return FoundationModel(ModelConfig.preset(self.preset, elements=elements, **overrides))

    def r_max(self) -> float:
        """The cutoff (Å) of the model this section builds."""
        from ..model import ModelConfig
        if self.config is not None and "r_max" in self.config:
            return float(self.config["r_max"])
        return float(self.overrides.get("r_max") or ModelConfig.preset(self.preset, elements=["H"]).r_max)


@dataclass
class OptimConfig:
    """Optimizer (torch AdamW/Adam handed to DeepSpeed) and gradient clipping (global L2 norm, 0 = off).
    ``amsgrad``: the AMSGrad variant (denominator from the running maximum of the second moment), which
    mace-torch uses by default."""
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    grad_clip: float = 10.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then cosine to ``min_lr_ratio * lr``, or reduce-on-plateau
    (validation loss, counted in validations), or constant after warmup."""
    name: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    plateau_threshold: float = 1e-4


@dataclass
class LossStage:
    """From fraction ``start`` of ``max_steps`` on, these coefficients replace the base ones (key by key)."""
    start: float = 0.8
    coefficients: dict[str, float] = field(default_factory=dict)


@dataclass
class LossConfig:
    """One loss: sum over properties of coefficient x mean error, MSE or Huber (``huber_delta`` in label units).

    Energy enters per atom (eV/atom); forces per component (eV/Å); stress per component (eV/Å³); ``hvp``
    (Hessian-vector products H v of the stored unit vectors, distillation) per component (eV/Å²).
    ``dataset_weights`` multiplies each structure's terms by its dataset's weight (default 1).
    """
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = 0.01
    coefficients: dict[str, float] = field(default_factory=lambda: {keys.ENERGY: 1.0, keys.FORCES: 10.0})
    dataset_weights: list[float] | None = None
    schedule: list[LossStage] = field(default_factory=list)


@dataclass
class EngineConfig:
    """DeepSpeed: ZeRO stage (0, 1, 2), precision (``auto`` = fp64 for a float64 model; for a float32 model bf16
    where the device supports it, else fp32; ``fp64`` needs a float64 model and ZeRO 0; see engine.py),
    gradient accumulation (micro-batches per optimizer step per rank), process-group backend."""
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    gradient_accumulation: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for validation and export."""
    enabled: bool = True
    decay: float = 0.99


@dataclass
class RefitE0Config:
    """After the last step, add to each head's per-element reference energies the least-squares fit of the
    EMA model's energy residuals on up to ``max_structures`` training structures (``refit.py``): energies
    shift by per-element constants, forces and stress are unchanged."""
    enabled: bool = False
    max_structures: int = 2000


@dataclass
class TrainConfig:
    """A whole run. ``max_steps`` counts optimizer steps; ``*_every`` too. Checkpoints go to ``out_dir``."""
    out_dir: str = "runs/pretrain"
    seed: int = 0
    max_steps: int = 1000
    log_every: int = 10
    valid_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    refit_e0: RefitE0Config = field(default_factory=RefitE0Config)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A validated config from a nested dict (as read from YAML); unknown keys name the nearest valid one."""
        return build(cls, values or {}).validate()

    def validate(self) -> TrainConfig:
        """Check value ranges and cross-field consistency; returns self. Raises ``ValueError`` naming the key."""
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        for name in ("log_every", "valid_every", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.engine.zero_stage in (0, 1, 2), "engine.zero_stage", "must be 0, 1 or 2 (stage 3 is not supported)")
        check(self.engine.gradient_accumulation >= 1, "engine.gradient_accumulation", "must be >= 1")
        check(self.data.max_atoms >= 1, "data.max_atoms", "must be >= 1")
        check(0.0 <= self.data.valid_fraction < 1.0, "data.valid_fraction", "must be in [0, 1)")
        check(0.0 <= self.ema.decay < 1.0, "ema.decay", "must be in [0, 1)")
        check(self.optim.lr > 0, "optim.lr", "must be > 0")
        check(self.refit_e0.max_structures >= 1, "refit_e0.max_structures", "must be >= 1")
        check(len(self.optim.betas) == 2, "optim.betas", "must be two numbers, e.g. [0.9, 0.999]")
        n = len(self.data.train)
        for name in ("heads", "weights"):
            value = getattr(self.data, name)
            check(value is None or len(value) == n, f"data.{name}", f"needs one entry per data.train path ({n})")
        check(self.loss.dataset_weights is None or len(self.loss.dataset_weights) == n, "loss.dataset_weights",
               f"needs one entry per data.train path ({n})")
        for where, coeffs in [("loss.coefficients", self.loss.coefficients)] + [
                (f"loss.schedule[{i}].coefficients", s.coefficients) for i, s in enumerate(self.loss.schedule)]:
            for k, v in coeffs.items():
                check(k in LOSS_PROPERTIES, f"{where}.{k}", f"is not a loss property; use one of {LOSS_PROPERTIES}"
                       + suggest(k, LOSS_PROPERTIES))
                check(v >= 0, f"{where}.{k}", "must be >= 0")
        for i, s in enumerate(self.loss.schedule):
            check(0.0 <= s.start <= 1.0, f"loss.schedule[{i}].start", "is a fraction of max_steps in [0, 1]")
        return self


def training_keys(config: TrainConfig) -> TrainConfig:
    """A plain ``TrainConfig`` (deep copy) of the training keys of any job's config (``FinetuneConfig``,
    ``DistillConfig`` ... extend ``TrainConfig``), without the job's own sections."""
    return TrainConfig(**{f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)})


def config_from_dict(values: dict) -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (as read from YAML)."""
    return TrainConfig.from_dict(values)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a pretraining recipe YAML, apply ``--set`` overrides, validate. Raises FileNotFoundError / ValueError."""
    return load_recipe(TrainConfig, path, overrides)


def config_to_dict(config: TrainConfig) -> dict:
    """Plain nested dict (YAML/JSON-serialisable) of a config; ``config_from_dict`` inverts it."""
    return to_dict(config)
