"""Model surgery for fine-tuning: heads, elements, freezing and LoRA adapters on a ``FoundationModel``.

Everything here works on the public structure of the model (its ``ModelConfig`` and named parameters), not
on the layer classes: which axis of a weight indexes heads or elements is found by building a probe model
with one more head (element) and comparing shapes. So:

- ``remap_heads`` / ``add_head``: a new model whose head j is a copy of old head ``sources[j]`` (weights and
  statistics E0, scale, shift), or freshly initialised when asked; every other weight is copied bit for bit.
- ``extend_elements``: new elements appended to ``config.elements``; every per-element weight gains rows
  (fresh random init for the new rows); old rows are copied, rescaled exactly where a layer normalises by the
  number of elements (its ``scale`` attribute changes), so old elements' predictions are unchanged up to
  rounding (one float multiply per weight).
- ``freeze_backbone``: only the heads train (readouts and the long-range charge head), plus, optionally, the
  rows of newly added elements (a gradient mask keeps the old rows bit-identical under Adam without weight decay).
- ``add_long_range``: a long-range charge head added to a model without one, starting at zero output.
- ``add_lora`` / ``merge_lora``: low-rank adapters W + (alpha/r) A B on every 2-D linear map of the backbone,
  as ``torch.nn.utils.parametrize`` parametrizations (B = 0 at init: the model is unchanged). ``merge_lora``
  folds them into plain weights so the state dict has exactly the base model's names (loadable strictly).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..model import FoundationModel, ModelConfig

PROBE_HEAD = "__probe_head__"
HEAD_MODULES = ("long_range.",)   # output heads besides the readouts: the long-range charge head


# --- helpers ---------------------------------------------------------------------------------------------------
def _build(config: ModelConfig, like: nn.Module, seed: int) -> FoundationModel:
    """A fresh model for ``config`` (weights seeded by ``seed``) on the device/dtype of ``like``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FoundationModel(config)
    p = next(like.parameters())
    return model.to(device=p.device, dtype=p.dtype)


def _varying_axes(config: ModelConfig, probe: ModelConfig) -> dict[str, int]:
    """{parameter name: axis} of the parameters whose shape differs between models built from the two configs."""
    a = {k: v.shape for k, v in FoundationModel(config).state_dict().items()}
    b = {k: v.shape for k, v in FoundationModel(probe).state_dict().items()}
    out = {}
    for name, shape in a.items():
        diff = [i for i, (x, y) in enumerate(zip(shape, b[name])) if x != y]
        if len(diff) > 1:
            raise ValueError(f"parameter {name} changes along several axes {diff}; cannot map it")
        if diff:
            out[name] = diff[0]
    return out


def head_axes(config: ModelConfig) -> dict[str, int]:
    """{parameter name: head axis} of the readout weights (one slice per head)."""
    probe = config.to_dict()
    probe.update(heads=config.heads + [PROBE_HEAD], atomic_energies=None, scale=None, shift=None)
    return _varying_axes(ModelConfig.from_dict(config.to_dict()), ModelConfig.from_dict(probe))


def with_elements(fields: dict, added: list[str]) -> dict:
    """Config fields with ``added`` elements appended: E0 0 eV in every head, and the per-element covalent radii
    of a distance transform / pair repulsion (imported mace models) from ASE's table, as mace-torch uses."""
    from ase.data import atomic_numbers, covalent_radii
    fields = dict(fields)
    fields["elements"] = list(fields["elements"]) + list(added)
    fields["atomic_energies"] = {h: list(v) + [0.0] * len(added) for h, v in fields["atomic_energies"].items()}
    for key in ("distance_transform", "pair_repulsion"):
        if fields.get(key):
            radii = [float(covalent_radii[atomic_numbers[s]]) for s in added]
            fields[key] = {**fields[key], "covalent_radii": list(fields[key]["covalent_radii"]) + radii}
    return fields


def element_axes(config: ModelConfig) -> dict[str, int]:
    """{parameter name: element axis} of the per-element weights (embedding, skips, product basis ...)."""
    spare = next(s for s in ("Og", "Ts", "Lv", "Mc") if s not in config.elements)
    probe = with_elements(config.to_dict(), [spare])
    return _varying_axes(ModelConfig.from_dict(config.to_dict()), ModelConfig.from_dict(probe))


def _module_scales(model: nn.Module) -> dict[str, float]:
    """{module name: float ``scale`` attribute} (layers that multiply their weights by a normalisation)."""
    return {name: float(m.scale) for name, m in model.named_modules() if isinstance(getattr(m, "scale", None), float)}


# --- heads ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def remap_heads(model: FoundationModel, heads: list[str], sources: list[str | None], seed: int = 0) -> FoundationModel:
    """A new model with readout heads ``heads``; head j copies old head ``sources[j]`` (None: fresh random weights
    and the first head's statistics). Backbone weights are copied bit for bit; ``model`` is not modified."""
    cfg = model.config
    if len(heads) != len(sources):
        raise ValueError(f"remap_heads: {len(heads)} heads but {len(sources)} sources")
    src = [None if s is None else cfg.head_index(s) for s in sources]
    stats_src = [cfg.heads[0] if s is None else cfg.heads[s] for s in src]
    new = cfg.to_dict()
    new.update(heads=list(heads), atomic_energies={h: list(cfg.atomic_energies[s]) for h, s in zip(heads, stats_src)},
               scale={h: cfg.scale[s] for h, s in zip(heads, stats_src)},
               shift={h: cfg.shift[s] for h, s in zip(heads, stats_src)})
    out = _build(ModelConfig.from_dict(new), model, seed)
    axes = head_axes(cfg)
    old_state, state = model.state_dict(), out.state_dict()
    for name, value in old_state.items():
        if name not in axes:
            state[name].copy_(value)
            continue
        ax = axes[name]
        for j, s in enumerate(src):
            if s is not None:
                state[name].select(ax, j).copy_(value.select(ax, s))
    out.load_state_dict(state)
    out.hub_metadata = dict(getattr(model, "hub_metadata", None) or {})
    return out


def add_head(model: FoundationModel, name: str, source: str | None = None, init: str = "copy",
             seed: int = 0) -> FoundationModel:
    """``model`` with one more head ``name``: a copy of head ``source`` (default the first) or, with
    ``init="random"``, freshly initialised (statistics still copied from ``source``)."""
    cfg = model.config
    if name in cfg.heads:
        raise ValueError(f"head {name!r} already exists (heads {cfg.heads}); choose a new name")
    if init not in ("copy", "random"):
        raise ValueError(f"head init must be 'copy' or 'random', got {init!r}")
    source = cfg.heads[cfg.head_index(source)]
    out = remap_heads(model, cfg.heads + [name], cfg.heads + [source if init == "copy" else None], seed)
    if init == "random":
        out.set_statistics(atomic_energies=cfg.atomic_energies[source], scale=cfg.scale[source],
                           shift=cfg.shift[source], head=name)
    return out


def reinit_head(model: FoundationModel, head: str, seed: int = 0) -> FoundationModel:
    """``model`` with the readout weights of ``head`` freshly initialised (its statistics kept)."""
    cfg = model.config
    name = cfg.heads[cfg.head_index(head)]
    out = remap_heads(model, cfg.heads, [None if h == name else h for h in cfg.heads], seed)
    out.set_statistics(atomic_energies=cfg.atomic_energies[name], scale=cfg.scale[name], shift=cfg.shift[name],
                       head=name)
    return out


# --- elements ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def extend_elements(model: FoundationModel, new_elements: list[str], seed: int = 0) -> FoundationModel:
    """A new model covering ``config.elements + new_elements`` (E0 of new elements 0 eV in every head).

    Old rows of per-element weights are copied (times s_old/s_new where a layer's normalisation ``scale``
    depends on the element count), new rows are a fresh random init; all other weights are copied bit for bit.
    """
    cfg = model.config
    known = [s for s in new_elements if s in cfg.elements]
    if known:
        raise ValueError(f"elements {known} are already in the model ({cfg.elements}); add only new elements")
    if not new_elements:
        return model
    out = _build(ModelConfig.from_dict(with_elements(cfg.to_dict(), list(new_elements))), model, seed)
    axes = element_axes(cfg)
    old_scales, new_scales = _module_scales(model), _module_scales(out)
    old_state, state = model.state_dict(), out.state_dict()
    n_old = len(cfg.elements)
    for name, value in old_state.items():
        if name not in axes:
            state[name].copy_(value)
            continue
        owner = name.rsplit(".", 1)[0]
        owner = owner if owner in old_scales else owner.rsplit(".", 1)[0]   # ParameterList entries: module.weights.k
        factor = old_scales[owner] / new_scales[owner] if owner in old_scales else 1.0
        rows = state[name].narrow(axes[name], 0, n_old)
        rows.copy_(value if factor == 1.0 else value * factor)
    out.load_state_dict(state)
    out.hub_metadata = dict(getattr(model, "hub_metadata", None) or {})
    return out


# --- long-range head -----------------------------------------------------------------------------------------
@torch.no_grad()
def add_long_range(model: FoundationModel, settings: dict, seed: int = 0) -> FoundationModel:
    """``model`` plus a long-range charge head (``settings`` as ``ModelConfig.long_range``), all other weights
    copied bit for bit. The head's output layer starts at zero: raw charges 0, so q_i = Q/N and neutral structures
    get E_lr = 0 (the model predicts exactly what ``model`` predicts); a charged structure gets the Coulomb energy
    of a uniform Q/N charge until the head has learnt."""
    cfg = model.config
    if cfg.long_range is not None:
        raise ValueError(f"the base model already has a long-range head ({cfg.long_range}); remove "
                         "finetune.long_range (the head is fine-tuned with the others)")
    new = cfg.to_dict()
    new["long_range"] = dict(settings)
    out = _build(ModelConfig.from_dict(new), model, seed)
    state = out.state_dict()
    for name, value in model.state_dict().items():
        state[name].copy_(value)
    out.load_state_dict(state)
    last = [m for m in out.long_range.modules() if isinstance(m, nn.Linear)][-1]
    last.weight.zero_()
    if last.bias is not None:
        last.bias.zero_()
    out.hub_metadata = dict(getattr(model, "hub_metadata", None) or {})
    return out


# --- freezing ---------------------------------------------------------------------------------------------------
def freeze_backbone(model: FoundationModel, train_elements: list[str] | None = None) -> list[str]:
    """Freeze everything but the heads (readouts, long-range charge head). With ``train_elements``, the rows of
    those elements in every per-element weight stay trainable through a gradient mask (other rows get zero
    gradient: with Adam and no weight decay they stay bit-identical). Returns the names of the trainable
    parameters."""
    cfg = model.config
    heads, elems = head_axes(cfg), element_axes(cfg)
    rows = [cfg.elements.index(s) for s in (train_elements or [])]
    trainable = []
    for name, p in model.named_parameters():
        if name in heads or name.startswith(HEAD_MODULES):
            p.requires_grad_(True)
            trainable.append(name)
        elif rows and name in elems:
            p.requires_grad_(True)
            mask_rows(p, elems[name], rows)
            trainable.append(name)
        else:
            p.requires_grad_(False)
    return trainable


def mask_rows(p: nn.Parameter, axis: int, rows: list[int]) -> None:
    """Only ``rows`` (along ``axis``) of ``p`` receive gradient (a tensor hook zeroes the others)."""
    mask = torch.zeros(p.shape[axis], dtype=torch.bool)
    mask[rows] = True
    shape = [1] * p.dim()
    shape[axis] = -1
    mask = mask.view(shape)
    p.register_hook(lambda g: g * mask.to(device=g.device, dtype=g.dtype))


# --- LoRA -------------------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """Parametrization W (c_in, c_out) -> W + (alpha / rank) A B, A (c_in, r) ~ N(0, 1/c_in), B (r, c_out) = 0."""

    def __init__(self, c_in: int, c_out: int, rank: int, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(c_in, rank, dtype=dtype, device=device) / math.sqrt(c_in))
        self.lora_b = nn.Parameter(torch.zeros(rank, c_out, dtype=dtype, device=device))
        self.scaling = float(alpha) / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_a @ self.lora_b).to(weight.dtype) * self.scaling


def lora_targets(model: FoundationModel) -> list[str]:
    """Names of the backbone's linear maps: 2-D weights that are neither per head nor per element (nor in the
    long-range charge head, which trains fully like the readouts)."""
    cfg = model.config
    skip = set(head_axes(cfg)) | set(element_axes(cfg))
    return [name for name, p in model.named_parameters()
            if p.dim() == 2 and name not in skip and not name.startswith(HEAD_MODULES)]


def add_lora(model: FoundationModel, rank: int, alpha: float, seed: int = 0,
             train_elements: list[str] | None = None) -> list[str]:
    """Freeze the backbone (``freeze_backbone``: heads and the rows of ``train_elements`` stay trainable) and put a
    LoRA adapter on every ``lora_targets`` weight (in place). Returns the adapted parameter names."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    targets = lora_targets(model)
    freeze_backbone(model, train_elements)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in targets:
            owner_name, attr = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            w = getattr(owner, attr)
            r = min(rank, *w.shape)
            parametrize.register_parametrization(owner, attr, LoRA(w.shape[0], w.shape[1], r, alpha, w.dtype, w.device))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
    return targets


def lora_keys(keys) -> list[str]:
    """The state-dict keys among ``keys`` that belong to unmerged LoRA adapters (``add_lora``'s parametrizations)."""
    return sorted(k for k in keys if ".parametrizations." in k or ".lora_" in k)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its weight (in place); the state dict then has the base model's names."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                if any(isinstance(p, LoRA) for p in module.parametrizations[attr]):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with every LoRA adapter folded into its weight, under the base names."""
    out = {}
    for name, value in model.state_dict().items():
        if ".parametrizations." not in name:
            out[name] = value
            continue
        prefix, rest = name.split(".parametrizations.", 1)
        attr, tail = rest.split(".", 1)
        if tail == "original":
            out[f"{prefix}.{attr}"] = getattr(model.get_submodule(prefix), attr).detach().clone()
    return out


def merged_copy(model: nn.Module) -> FoundationModel:
    """A new ``FoundationModel`` (same config, dtype, device) holding ``model``'s weights with LoRA merged;
    ``model`` keeps its adapters. (``copy.deepcopy`` + ``remove_parametrizations`` would share the
    parametrized class with ``model`` and break it.)"""
    p = next(model.parameters())
    out = FoundationModel(ModelConfig.from_dict(model.config.to_dict())).to(device=p.device, dtype=p.dtype)
    out.load_state_dict(merged_state_dict(model), strict=True)
    out.hub_metadata = dict(getattr(model, "hub_metadata", None) or {})
    return out
