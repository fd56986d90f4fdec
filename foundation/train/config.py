"""``TrainConfig``: the whole description of a training run, as dataclasses validated on load.

A recipe is a YAML file whose sections mirror the dataclasses below. Loading is strict: an unknown or misspelt
key is a ``ValueError`` naming the key, where it is, and the nearest valid key; values are type-checked.
``--set section.key=value`` overrides are parsed as YAML scalars/lists (``--set optim.lr=3e-4``,
``--set data.train=[a,b]``) and go through the same validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .. import keys

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
    heads: Union[list[str], None] = None
    weights: Union[list[float], None] = None
    valid_fraction: float = 0.05
    max_atoms: int = 256
    num_workers: int = 0
    shuffle: bool = True


@dataclass
class ModelSection:
    """``ModelConfig.preset(preset, elements=..., **overrides)``; elements default to the training data's."""
    preset: str = "small"
    elements: Union[list[str], None] = None
    overrides: dict[str, Any] = field(default_factory=dict)


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
    ``hvp_off_at_force_mae`` (eV/Å): once a validation's force MAE (all datasets) is at or below it, the ``hvp``
    coefficient is 0 for the rest of the run (the switch is kept in checkpoints); None = never.
    """
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = 0.01
    coefficients: dict[str, float] = field(default_factory=lambda: {keys.ENERGY: 1.0, keys.FORCES: 10.0})
    dataset_weights: Union[list[float], None] = None
    schedule: list[LossStage] = field(default_factory=list)
    hvp_off_at_force_mae: Union[float, None] = None


@dataclass
class EngineConfig:
    """DeepSpeed: ZeRO stage (0, 1, 2), precision (``auto`` = bf16 where the device supports it, else fp32),
    gradient accumulation (micro-batches per optimizer step per rank), process-group backend."""
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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

    def validate(self) -> "TrainConfig":
        """Check value ranges and cross-field consistency; returns self. Raises ``ValueError`` naming the key."""
        _check(self.max_steps >= 1, "max_steps", "must be >= 1")
        for name in ("log_every", "valid_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.engine.zero_stage in (0, 1, 2), "engine.zero_stage", "must be 0, 1 or 2 (stage 3 is not supported)")
        _check(self.engine.gradient_accumulation >= 1, "engine.gradient_accumulation", "must be >= 1")
        _check(self.data.max_atoms >= 1, "data.max_atoms", "must be >= 1")
        _check(0.0 <= self.data.valid_fraction < 1.0, "data.valid_fraction", "must be in [0, 1)")
        _check(0.0 <= self.ema.decay < 1.0, "ema.decay", "must be in [0, 1)")
        _check(self.optim.lr > 0, "optim.lr", "must be > 0")
        _check(self.refit_e0.max_structures >= 1, "refit_e0.max_structures", "must be >= 1")
        _check(len(self.optim.betas) == 2, "optim.betas", "must be two numbers, e.g. [0.9, 0.999]")
        n = len(self.data.train)
        for name in ("heads", "weights"):
            value = getattr(self.data, name)
            _check(value is None or len(value) == n, f"data.{name}", f"needs one entry per data.train path ({n})")
        _check(self.loss.dataset_weights is None or len(self.loss.dataset_weights) == n, "loss.dataset_weights",
               f"needs one entry per data.train path ({n})")
        for where, coeffs in [("loss.coefficients", self.loss.coefficients)] + [
                (f"loss.schedule[{i}].coefficients", s.coefficients) for i, s in enumerate(self.loss.schedule)]:
            for k, v in coeffs.items():
                _check(k in LOSS_PROPERTIES, f"{where}.{k}", f"is not a loss property; use one of {LOSS_PROPERTIES}"
                       + _suggest(k, LOSS_PROPERTIES))
                _check(v >= 0, f"{where}.{k}", "must be >= 0")
        _check(self.loss.hvp_off_at_force_mae is None or self.loss.hvp_off_at_force_mae >= 0,
               "loss.hvp_off_at_force_mae", "must be >= 0 eV/Å (or null: never switch the hvp term off)")
        for i, s in enumerate(self.loss.schedule):
            _check(0.0 <= s.start <= 1.0, f"loss.schedule[{i}].start", "is a fraction of max_steps in [0, 1]")
        return self


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"recipe key {key!r} {message}")


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return (f"; did you mean {close[0]!r}?" if close else "") + f" (valid: {', '.join(sorted(valid))})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from YAML) checked against the annotation ``tp``; dataclasses are built recursively."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"recipe key {where!r} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where + ".")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"recipe key {where!r} is {value!r}; expected one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:  # a single path where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"recipe key {where!r} must be a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"recipe key {where!r} must be a mapping, got {value!r}")
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"recipe key {where!r} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix + str(key)!r}" + _suggest(str(key), names))
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (as read from YAML)."""
    return _build(TrainConfig, values or {}).validate()


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to the nested dict ``values`` in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        key, raw = item.split("=", 1)
        node, parts = values, key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe YAML, apply ``--set`` overrides, validate. Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} not found; recipes ship in recipes/*.yaml")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {str(path)!r} must be a YAML mapping of sections (data:, model:, optim: ...)")
    try:
        return config_from_dict(apply_overrides(values, overrides or []))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def config_to_dict(config: TrainConfig) -> dict:
    """Plain nested dict (YAML/JSON-serialisable) of a config; ``config_from_dict`` inverts it."""
    return dataclasses.asdict(config)
