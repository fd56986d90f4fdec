"""``foundation finetune RECIPE.yaml``: a pretrained model -> a model fine-tuned on new data, right at step 0.

Order of work (``finetune``):

  1. load the base model (directory, or Hub id at a pinned revision); check ``base.head`` exists
  2. new data: LMDB dataset directories as they are, ASE-readable files converted into ``cache_dir``;
     replay data likewise (a seeded sample of ``replay.samples`` structures written as its own dataset)
  3. elements of the new data the base never saw are added (``surgery.extend_elements``)
  4. heads laid out so that dataset k trains head k: [target, (base head when replaying), other heads...];
     a new head starts as a copy of the base head unless ``head_init: random``
  5. zero-shot errors of the base on the new validation data (table, before and after the E0 refit) and
     per-element reference energies refitted by least squares (table old / new / difference)
  6. strategy: full, frozen (heads only), lora (adapters, merged on export), replay (multi-head)
  7. a step-0 check: the model about to be trained predicts what the base with refitted E0 predicts
  8. training with the DeepSpeed ``Trainer`` (statistics are not recomputed: they come from the base + refit),
     export with ``save_pretrained`` (LoRA merged), forgetting on ``monitor`` data reported as a table.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import keys
from ..evaluate import predict
from ..train.loop import Trainer
from . import surgery
from .config import FinetuneConfig, load_finetune_config
from .data import configure_data, prepare_paths

STEP0_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}   # eV (energies), eV/Å (forces): relative to 1 + |value|


# --- inputs -----------------------------------------------------------------------------------------------------
def load_base(model: str, revision: str | None = None):
    """The base ``FoundationModel`` from a directory or a Hub id (at ``revision``), in eval mode on CPU."""
    from ..model import FoundationModel
    return FoundationModel.from_pretrained(model, revision=revision)


# --- E0 and tables ---------------------------------------------------------------------------------------------
def refit_e0(config, head: str, numbers: list, labels: np.ndarray, preds: np.ndarray, how) -> dict[str, float]:
    """New per-element reference energies (eV, every model element) of ``head``, by the same per-atom least
    squares as the closing refit of training (``train.refit.per_atom_least_squares``):

    residual: E0 + argmin sum_s ((E_s - P_s - sum_z n_sz dE0_z) / N_s)^2 (keeps the model's interaction energies);
    total: argmin sum_s ((E_s - sum_z n_sz E0_z) / N_s)^2; keep: unchanged; a dict {symbol: eV}: those values.
    Elements absent from the data keep their E0. With fewer distinct compositions than elements the minimum-norm
    solution is used.
    """
    from ase.data import chemical_symbols

    from ..train.refit import per_atom_least_squares
    old = dict(zip(config.elements, config.atomic_energies[head]))
    if isinstance(how, dict):
        unknown = [s for s in how if s not in old]
        if unknown:
            raise ValueError(f"finetune.e0 gives values for {unknown}, which are neither in the base model nor in "
                             f"the new data (model elements {config.elements})")
        return {s: float(how.get(s, v)) for s, v in old.items()}
    if how == "keep" or not len(labels):
        return old
    fit = per_atom_least_squares(numbers, labels - preds if how == "residual" else labels)
    new = dict(old)
    for z, value in fit.items():
        s = chemical_symbols[z]
        new[s] = (old[s] + value) if how == "residual" else value
    return new


def e0_table(old: dict[str, float], new: dict[str, float], added: list[str] = ()) -> str:
    """Per element: old / new / new - old (eV); '-' for elements the base never had."""
    lines = [f"{'element':8s} {'old E0 (eV)':>16s} {'new E0 (eV)':>16s} {'difference (eV)':>16s}"]
    for s in new:
        if s in added:
            lines.append(f"{s:8s} {'-':>16s} {new[s]:16.6f} {'-':>16s}")
        else:
            lines.append(f"{s:8s} {old[s]:16.6f} {new[s]:16.6f} {new[s] - old[s]:16.6f}")
    return "\n".join(lines)


def comparison_table(columns: dict[str, dict], title: str = "property") -> str:
    """Metrics side by side: rows "group/property", per column MAE and RMSE (x1000: meV, meV/Å, meV/Å^3)."""
    from ..train.metrics import UNITS
    names = list(columns)
    rows = list(dict.fromkeys(k for c in columns.values() for k in c))
    head = f"{title:44s} {'unit':>10s}" + "".join(f" {n + ' MAE':>18s} {n + ' RMSE':>18s}" for n in names)
    lines = [head]
    for r in rows:
        unit = "m" + UNITS[r.rsplit("/", 1)[1]]
        cells = "".join(f" {1000 * columns[n][r]['mae']:18.4f} {1000 * columns[n][r]['rmse']:18.4f}"
                        if r in columns[n] else f" {'-':>18s} {'-':>18s}" for n in names)
        lines.append(f"{r:44s} {unit:>10s}{cells}")
    return "\n".join(lines)


def max_prediction_difference(a, b, datasets: list, max_atoms: int = 256) -> float:
    """max |pred_a - pred_b| over energies (eV) and forces (eV/Å) on ``datasets``, relative to 1 + |pred_b|."""
    from ..train.data import make_eval_loader
    worst = 0.0
    for batch in make_eval_loader(datasets, max_atoms, rank=0, world=1):
        pa, pb = a(batch, compute_forces=True), b(batch, compute_forces=True)
        for k in (keys.ENERGY, keys.FORCES):
            d = ((pa[k].double() - pb[k].double()).abs() / (1 + pb[k].double().abs())).max()
            worst = max(worst, float(d))
    return worst


# --- the model to fine-tune -------------------------------------------------------------------------------------
def layout_heads(base, config: FinetuneConfig) -> tuple[list[str], list[str]]:
    """(data heads: one per training dataset, model heads in order) - the first len(data heads) model heads are
    the data heads, in order, so that a dataset's head index is the model's head index."""
    source = base.config.heads[base.config.head_index(config.base.head)]
    target = config.finetune.head or source
    if config.finetune.head and config.finetune.head in base.config.heads:
        raise ValueError(f"finetune.head {target!r} already exists in the base model (heads {base.config.heads}); "
                         "name a new head, or leave finetune.head empty to fine-tune base.head in place")
    data_heads = [target] + ([source] if config.finetune.strategy == "replay" else [])
    rest = [h for h in base.config.heads if h not in data_heads]
    return data_heads, data_heads + rest


def prepare_model(base, config: FinetuneConfig, new_elements: list[str]):
    """(reference, model): the base with added elements and laid-out heads, every new head a copy of the base
    head (``reference``); ``model`` = the same with ``head_init: random`` applied to the target head."""
    source = base.config.heads[base.config.head_index(config.base.head)]
    extended = surgery.extend_elements(base, new_elements, seed=config.seed)
    if config.finetune.long_range is not None:
        extended = surgery.add_long_range(extended, config.finetune.long_range, seed=config.seed)
    _, order = layout_heads(base, config)
    sources = [source if h not in base.config.heads else h for h in order]
    reference = surgery.remap_heads(extended, order, sources, seed=config.seed)
    model = reference
    if config.finetune.head_init == "random":
        model = surgery.reinit_head(reference, order[0], seed=config.seed + 1)
    return reference, copy.deepcopy(model)


def apply_strategy(model, config: FinetuneConfig, new_elements: list[str]) -> list[str]:
    """Set what trains (in place); returns the trainable parameter names."""
    strategy = config.finetune.strategy
    masked = bool(new_elements) and strategy in ("frozen", "lora")
    if masked and config.optim.weight_decay > 0:
        raise ValueError(f"optim.weight_decay={config.optim.weight_decay} would change the frozen rows of "
                         f"the old elements while training the new elements {new_elements}; set it to 0")
    if strategy == "frozen":
        surgery.freeze_backbone(model, new_elements)
    elif strategy == "lora":
        surgery.add_lora(model, config.lora.rank, config.lora.alpha, seed=config.seed,
                         train_elements=new_elements)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --- orchestration ----------------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig, log: Callable[[str], None] = print, train: bool = True, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Run the fine-tuning described by ``config``; returns {"zero_shot", "e0_old", "e0_new", "added_elements",
    "step0_difference", "metrics", "forgetting", "model_dir", "model"} (see the module docstring).
    ``train=False`` stops before the first step (the prepared model is returned under "model").
    ``resume``/``overwrite``: continue from / delete the checkpoints of an earlier run in ``out_dir`` (refused
    without one of them); ``out_dir`` is locked against a second run meanwhile (``train.outdir``)."""
    from ..train import outdir
    rank = int(os.environ.get("RANK", "0"))
    outdir.claim(config.out_dir, rank, resume=resume, overwrite=overwrite, verb="finetune")
    try:
        return _finetune(config, log, train, resume, overwrite)
    finally:
        outdir.release(config.out_dir, rank)


def _finetune(config: FinetuneConfig, log: Callable[[str], None], train: bool, resume: bool, overwrite: bool) -> dict:
    from ..train.data import check_loss_labels, elements_of, open_datasets
    c = t = config
    if int(os.environ.get("RANK", "0")) != 0:   # under torchrun/deepspeed every rank prepares; rank 0 reports
        log = _quiet
    base = load_base(c.base.model, c.base.revision)
    r_max = float(base.config.r_max)
    cache = Path(c.finetune.cache_dir or Path(t.out_dir) / "data")
    data_heads, order = layout_heads(base, c)
    configure_data(c, data_heads, cache, r_max)
    t.validate()
    _check_loss_targets(base.config.long_range or c.finetune.long_range, t)
    check_loss_labels(t)
    train_sets, valid_sets = open_datasets(t, r_max)
    for ds in train_sets + valid_sets:
        getattr(ds, "dataset", ds).dtype = base.dtype   # exact float64 labels for the E0 fit and the tables
    new_data = [d for d, h in zip(train_sets, t.data.heads) if h == data_heads[0]]
    n_train = len(t.data.train)
    new_valid = [d for k, d in enumerate(valid_sets)
                 if t.data.heads[min(k, n_train - 1) if c.data.valid else k] == data_heads[0]]
    missing = [s for s in elements_of(new_data) if s not in base.config.elements]
    if missing and not c.finetune.add_elements:
        raise ValueError(f"the new data contains elements {missing} the base model does not know "
                         f"({base.config.elements}); set finetune.add_elements: true to add them")
    if missing:
        log(f"adding elements {missing} to the base model (new embedding rows; the other weights kept)")
    known = [*base.config.elements, *missing]
    check_base_domain([d for d, h in zip(train_sets, t.data.heads) if h != data_heads[0]], known, "replay.data")
    reference, model = prepare_model(base, c, missing)
    target = order[0]

    source = base.config.heads[base.config.head_index(c.base.head)]
    monitor = _open_monitor(c, order.index(source), r_max, cache)
    check_base_domain(monitor, known, "finetune.monitor")
    monitor_before = predict(reference, monitor, order, t.data.max_atoms).metrics if monitor else {}
    fit = predict(reference, new_data, order, t.data.max_atoms)
    old = dict(zip(reference.config.elements, reference.config.atomic_energies[target]))
    new = refit_e0(reference.config, target, fit.numbers, fit.labels, fit.preds, c.finetune.e0)
    before = predict(reference, new_valid, order, t.data.max_atoms).metrics if new_valid else {}
    for m in (reference, model):
        m.set_statistics(atomic_energies=new, head=target)
    after = predict(reference, new_valid, order, t.data.max_atoms).metrics if new_valid else {}
    how = "set from the recipe" if isinstance(c.finetune.e0, dict) else f"refitted by least squares ({c.finetune.e0})"
    log(f"per-element reference energies of head {target!r} {how}:\n"
        + e0_table(old, new, missing))
    if new_valid:
        log("zero-shot errors of the base model on the new validation data:\n"
            + comparison_table({"base E0": before, "refit E0": after}))

    trainable = apply_strategy(model, c, missing)
    check = new_valid or new_data
    step0 = max_prediction_difference(model, reference, check, t.data.max_atoms)
    log(f"strategy {c.finetune.strategy}: {sum(model.get_parameter(n).numel() for n in trainable)} of "
        f"{sum(p.numel() for p in model.parameters())} parameters train; step-0 check: max relative difference "
        f"to the base with refitted E0 = {step0:.3g}" + (" (head re-initialised as asked)"
                                                         if c.finetune.head_init == "random" else ""))
    if c.finetune.head_init == "copy" and step0 > STEP0_TOL.get(model.dtype, 1e-4):
        raise RuntimeError(f"step-0 check failed: the prepared model differs from the base by {step0:.3g}")
    result = {"zero_shot": {"base_e0": before, "refit_e0": after}, "e0_old": old, "e0_new": new,
              "added_elements": missing, "step0_difference": step0, "model": model, "heads": order}
    if not train:
        return result
    # statistics stay as prepared (base + E0 refit: refitting scale/shift on the new data would change the model
    # at step 0); LoRA adapters are merged into the exported weights
    lora = surgery.merged_copy if surgery.has_lora(model) else None
    metrics = Trainer(t, model=model, fit_statistics=False, export_transform=lora, resume=resume,
                      overwrite=overwrite, description=describe(c, target, source)).fit()
    result.update(metrics=metrics, model_dir=Path(t.out_dir) / "model")
    if monitor:
        from ..model import FoundationModel
        tuned = FoundationModel.from_pretrained(result["model_dir"])
        after_ft = predict(tuned, monitor, order, t.data.max_atoms).metrics
        result["forgetting"] = {"base": monitor_before, "finetuned": after_ft}
        log(f"pretraining validation data on head {source!r} (forgetting):\n"
            + comparison_table({"base": monitor_before, "finetuned": after_ft}))
    return result


def describe(c: FinetuneConfig, target: str, source: str) -> str:
    """The fine-tuned model card's summary: the base (and its pinned revision), heads and strategy."""
    revision = f" at revision `{c.base.revision}`" if c.base.revision else ""
    if target == source:
        heads = f"head `{target}` fine-tuned in place"
    elif c.finetune.head_init == "copy":
        heads = f"new head `{target}`, a copy of `{source}` at step 0"
    else:
        heads = f"new head `{target}` (freshly initialised) beside `{source}`"
    text = f"Fine-tuned with `foundation finetune` from `{c.base.model}`{revision}: {heads}; strategy " \
           f"`{c.finetune.strategy}`"
    if c.finetune.strategy == "replay" and c.replay is not None:
        text += (f", `{source}` trained on a replay sample of the pretraining data ({c.replay.samples or 'all'} "
                 f"structures, weight {c.replay.weight:g})")
    return text + ". The training datasets and validation metrics are below."


def _quiet(_: str) -> None:
    return None


def _check_loss_targets(long_range, t) -> None:
    """Loss terms the model cannot predict (charges/dipole/charge excess without a long-range head) are errors."""
    if long_range is None:
        for where, coeffs in [("loss.coefficients", t.loss.coefficients)] + [
                (f"loss.schedule[{i}].coefficients", s.coefficients) for i, s in enumerate(t.loss.schedule)]:
            bad = [k for k in (keys.CHARGES, keys.DIPOLE, keys.CHARGE_EXCESS) if coeffs.get(k, 0) > 0]
            if bad:
                raise ValueError(f"{where} weights {bad}, but the base model has no long-range charge head "
                                 "(model_config.long_range is None), so it predicts no charges; set them to 0 "
                                 "or add a head with finetune.long_range: {kind: coulomb}")


def check_base_domain(datasets: list, known: list[str], key: str) -> None:
    """Replay and monitor data are evaluated on the base head: each dataset's elements must be ``known``."""
    for ds in datasets:
        for m in getattr(getattr(ds, "dataset", ds), "manifests", None) or []:
            extra = [s for s in m.get("elements") or [] if s not in known]
            if extra:
                raise ValueError(f"{key}: dataset {m.get('name')!r} contains elements {extra} that the base model "
                                 f"does not know ({known}); the base head can only replay or monitor data of its "
                                 f"own domain: give other data or remove {key}")


def _open_monitor(config: FinetuneConfig, head_index: int, r_max: float, cache: Path) -> list:
    """Pretraining validation datasets (``config.monitor``), evaluated on head ``head_index`` (the base head)."""
    from ..data.files import open_eval_data
    if not config.monitor:
        return []
    return open_eval_data(prepare_paths(config.monitor, cache, r_max), r_max, torch.float64, head=head_index)


def main(recipe: str, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> str:
    """``foundation finetune``: prints the tables as it goes; returns the final summary."""
    from ..train.metrics import format_table
    result = finetune(load_finetune_config(recipe, overrides), resume=resume, overwrite=overwrite)
    return f"model exported to {result['model_dir']}\n" + format_table(result.get("metrics") or {})
