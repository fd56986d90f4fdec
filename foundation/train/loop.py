"""The training loop: ``run(config)`` pretrains a model end to end with the DeepSpeed engine.

One optimizer step = ``engine.gradient_accumulation`` micro-batches on each rank. The label counts of all of
them (over all ranks) are reduced first, so each micro-batch's loss is normalised by the global count
(see ``engine.py``); the logged loss is exactly the loss of the global batch. Validation and export use the
EMA weights. Checkpoints (``checkpoint.py``) hold everything needed to continue bit for bit: weights,
optimizer (per-rank ZeRO partitions), scheduler, EMA, loader position, RNG states and step.
"""
from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import keys
from . import checkpoint as ckpt
from . import data as tdata
from . import guard, outdir
from .config import TrainConfig, config_to_dict
from .ema import EMA
from .engine import Engine, init_distributed
from .logger import RunLogger
from .loss import Loss, has_labels
from .metrics import MetricAccumulator, card_metrics, flatten
from .schedule import LRSchedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """State of one run on one rank; ``fit()`` trains to ``config.max_steps``."""

    def __init__(self, config: TrainConfig, model=None, resume: bool = False, fit_statistics: bool = True,
                 export_transform: Callable[[nn.Module], nn.Module] | None = None, description: str | None = None,
                 hooks: Sequence[Callable[[Trainer, dict], None]] = (), overwrite: bool = False):
        """``fit_statistics``: set E0s/scale/shift/neighbour count from the training data (False keeps a given
        model's, as fine-tuning and later distillation stages need); ``export_transform``: module -> module to
        save (e.g. LoRA merged), applied to the EMA weights at export; ``description``: the model card's summary
        (e.g. which base model was fine-tuned, and how); ``hooks``: ``hook(trainer, metrics)`` called on every
        rank after each validation with its metrics (e.g. to switch a loss term off with ``trainer.loss``; the
        loss's switches are checkpointed, so a hook needs no state of its own); ``resume``/``overwrite``: what to do
        with an earlier run's checkpoints in ``out_dir`` (refused otherwise; ``outdir.claim``, which also locks it
        against a second run until ``fit`` returns)."""
        self.config, self.out = config, Path(config.out_dir)
        self.export_transform, self.description, self.hooks = export_transform, description, list(hooks)
        self.rank, self.world = init_distributed(config.engine.backend)
        outdir.claim(self.out, self.rank, resume=resume, overwrite=overwrite)
        try:
            self._setup(config, model, resume, fit_statistics)
        except BaseException:
            outdir.release(self.out, self.rank)
            raise

    def _setup(self, config: TrainConfig, model, resume: bool, fit_statistics: bool) -> None:
        seed_everything(config.seed)
        self.head_names, self.dataset_heads = tdata.head_names(config)   # head index of each training set
        r_max = float(model.config.r_max) if model is not None else config.model.r_max()
        self.train_sets, self.valid_sets = tdata.open_datasets(config, r_max)
        if model is None:
            model = config.model.build(tdata.elements_of(self.train_sets) if not config.model.elements else [],
                                       self.head_names if config.data.heads else None)
        if fit_statistics:
            self.set_statistics(model, r_max)
        self.engine = Engine(model, config)
        self.loss = Loss(config.loss, config.max_steps)
        self.schedule = LRSchedule(config.schedule, config.optim.lr, config.max_steps)
        self.ema = EMA(self.engine.module, config.ema.decay) if config.ema.enabled else None
        self.loader = tdata.make_train_loader(config, self.train_sets, self.rank, self.world)
        self.valid_loader = (tdata.make_eval_loader(self.valid_sets, config.data.max_atoms, self.rank, self.world)
                             if self.valid_sets else None)
        self.step, self.metrics, self.refit_summary = 0, {}, None
        if resume:
            self.restore()
        self.logger = RunLogger(self.out, self.rank == 0, start_step=self.step, total=config.max_steps,
                                progress=config.progress)

    def sets_by_head(self) -> dict[str, list]:
        """{head name: its training datasets}."""
        return {name: [d for d, hd in zip(self.train_sets, self.dataset_heads) if hd == h]
                for h, name in enumerate(self.head_names)}

    def set_statistics(self, model, r_max: float) -> None:
        """E0s (least squares), scale (force RMS) and shift of each head's training data; the mean neighbour count,
        one number shared by every head (it normalises the backbone's messages), over all the training data."""
        elements, seen, per_head = _symbols(model.config.elements), set(), []
        for name, sets in self.sets_by_head().items():
            stats = tdata.statistics(sets, r_max)
            seen |= set(stats["atomic_energies"])
            stats["atomic_energies"] = tdata.fill_elements(stats["atomic_energies"], elements)
            per_head.append((stats.pop("avg_num_neighbors"), sum(int(d.natoms.sum()) for d in sets)))
            model.set_statistics(**stats, head=name if len(self.head_names) > 1 else None)
        atoms = sum(w for _, w in per_head)
        model.set_statistics(avg_num_neighbors=sum(a * w for a, w in per_head) / max(atoms, 1))  # atom-weighted
        if set(elements) - seen and self.rank == 0:
            warnings.warn(f"no training structure contains {sorted(set(elements) - seen)}: their reference "
                          "energies are 0 eV and their embeddings untrained", stacklevel=3)

    # --- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        """One optimizer step on the next ``gradient_accumulation`` micro-batches of every rank; returns the log
        row: global-batch loss and per-property terms, learning rate, gradient norm, atoms in the global batch."""
        engine, loss = self.engine, self.loss
        lr = self.schedule.apply(engine.optimizer)
        micro = [next(batches) for _ in range(engine.gas)]
        counts = engine.all_reduce_sum(sum(loss.counts(b) for b in micro))
        coeffs = loss.coefficients(self.step)
        sums = torch.zeros(len(loss.properties), dtype=torch.float64)
        atoms = 0
        engine.ds.train()
        for i, b in enumerate(micro):
            b = b.to(engine.device)
            pred = engine.forward(b, compute_forces=True, compute_stress=loss.needs_stress(b), training=True)
            if loss.needs_hvp(coeffs, b):   # distillation: H v of the stored unit vectors, graph kept
                with engine.autocast():
                    pred[keys.HESSIAN_PRODUCTS] = loss.predict_hvp(engine.module, b, create_graph=True)
            s = loss.sums(pred, b)
            guard.check_loss(s, loss.properties, self.step + 1, self.config.optim.lr, engine.all_reduce_sum)
            engine.backward(Loss.combine(s, counts, coeffs) * self.world)
            if i == len(micro) - 1 and engine.zero_stage == 0:   # gradients all-reduced, not yet applied
                guard.check_gradients(engine.module, self.step + 1, self.config.optim.lr, loss.properties)
            engine.step()
            sums += s.detach().cpu()
            atoms += int(b[keys.ATOMIC_NUMBERS].shape[0])
        guard.check_weights(engine.module, self.step + 1, self.config.optim.lr)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(engine.module)
        sums = engine.all_reduce_sum(sums)
        row = {"loss": float(Loss.combine(sums, counts, coeffs))}
        row.update({f"loss_{p}": float(sums[i] / max(counts[i], 1.0)) for i, p in enumerate(loss.properties)})
        row.update(lr=lr, grad_norm=engine.grad_norm(),
                   atoms=int(engine.all_reduce_sum(torch.tensor([atoms], dtype=torch.float64))[0]))
        return row

    # --- validation -------------------------------------------------------------------------------------------
    def validate(self) -> tuple[float, dict]:
        """(validation loss at the current coefficients, metrics) with the EMA weights, reduced over ranks."""
        module = self.engine.module
        acc = MetricAccumulator([d.name for d in self.valid_sets], self.head_names)
        sums = torch.zeros(len(self.loss.properties), dtype=torch.float64)
        counts = torch.zeros_like(sums)
        self.engine.ds.eval()
        with (self.ema.applied(module) if self.ema is not None else contextlib.nullcontext()):
            self.valid_loader.set_epoch(0)
            for b in self.valid_loader:
                b = b.to(self.engine.device)
                with self.engine.autocast():
                    pred = module(b, compute_forces=True, compute_stress=has_labels(b, keys.STRESS), training=False)
                    if self.loss.needs_hvp(self.loss.coefficients(self.step), b):
                        pred[keys.HESSIAN_PRODUCTS] = self.loss.predict_hvp(module, b, create_graph=False)
                pred = {k: v.detach() for k, v in pred.items()}
                acc.update(pred, b)
                sums += self.loss.sums(pred, b).cpu()
                counts += self.loss.counts(b)
        self.engine.ds.train()
        acc.reduce(self.engine.all_reduce_sum)
        sums, counts = self.engine.all_reduce_sum(sums), self.engine.all_reduce_sum(counts)
        return float(Loss.combine(sums, counts, self.loss.coefficients(self.step))), acc.result()

    def refit_e0(self) -> dict:
        """Least-squares E0 correction of each head from the EMA model's training residuals (``refit.py``),
        applied to the model (every rank computes the same); summary printed and written to refit_e0.json."""
        import json

        from .refit import refit_reference_energies
        module = self.engine.module
        with (self.ema.applied(module) if self.ema is not None else contextlib.nullcontext()):
            self.refit_summary = refit_reference_energies(module, self.sets_by_head(),
                                                          self.config.refit_e0.max_structures,
                                                          self.config.data.max_atoms, self.engine.device)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "refit_e0.json").write_text(json.dumps(self.refit_summary, indent=1))
            for head, s in self.refit_summary.items():
                print(f"refit_e0 {head}: mean energy residual {1000 * s['mean_residual_per_atom_before']:+.3f} -> "
                      f"{1000 * s['mean_residual_per_atom_after']:+.3f} meV/atom on {s['structures']} training "
                      f"structures (RMSE {1000 * s['rmse_per_atom_before']:.3f} -> "
                      f"{1000 * s['rmse_per_atom_after']:.3f})", flush=True)
        return self.refit_summary

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> None:
        root = self.out / "checkpoints"
        if self.rank == 0:
            ckpt.staging_dir(root, self.step)
        self.engine.barrier()
        tmp = root / (ckpt.step_name(self.step) + ".tmp")
        ckpt.save_tree({"optimizer": self.engine.optimizer_state(), "rng": ckpt.rng_state()},
                       tmp / f"rank_{self.rank:05d}")
        loader_state = self.loader.state_dict()
        if self.rank == 0:
            ckpt.save_module(self.engine.module, tmp / "model.safetensors")
            if self.ema is not None:
                ckpt.save_tree(self.ema.state_dict(), tmp / "ema")
            self.export(self.metrics, tmp / "model")          # ready-to-use EMA model of this step
        self.engine.barrier()
        if self.rank == 0:
            meta = {"world_size": self.world, "zero_stage": self.config.engine.zero_stage,
                    "config": config_to_dict(self.config), "schedule": self.schedule.state_dict(),
                    "loader": loader_state, "metrics": self.metrics, "loss": self.loss.state_dict()}
            ckpt.commit(root, self.step, meta, self.config.keep_checkpoints)
        self.engine.barrier()

    def restore(self) -> bool:
        """Continue from the latest intact checkpoint under ``out_dir`` (a damaged newest one is skipped, and the
        run says so); False (fresh start) when there is none."""
        path = ckpt.resumable(self.out / "checkpoints", log=_say if self.rank == 0 else None)
        if path is None:
            return False
        meta = ckpt.read_meta(path)
        for key, mine in (("world_size", self.world), ("zero_stage", self.config.engine.zero_stage)):
            if meta[key] != mine:
                raise ValueError(f"checkpoint {path} was written with {key}={meta[key]} but this run has {mine}; "
                                 f"resume with the same {key}")
        ckpt.load_module(self.engine.module, path / "model.safetensors")
        rank_state = ckpt.load_tree(path / f"rank_{self.rank:05d}")
        self.engine.load_optimizer_state(rank_state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.load_tree(path / "ema"))
        self.schedule.load_state_dict(meta["schedule"])
        self.loader.load_state_dict(meta["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.step, self.metrics = int(meta["step"]), meta.get("metrics") or {}
        self.loss.load_state_dict(meta.get("loss") or {})
        return True

    def export(self, metrics: dict | None = None, target: Path | None = None) -> Path:
        """``save_pretrained`` of the EMA weights (rank 0) to ``target`` (default ``out_dir/model``); the card
        carries ``metrics`` (validation, EMA weights), the training datasets and ``description``."""
        target = self.out / "model" if target is None else target
        if self.rank == 0:
            module = self.engine.module
            if not hasattr(module, "save_pretrained"):
                warnings.warn(f"{type(module).__name__} has no save_pretrained (foundation.hub.HubMixin): the "
                              f"export to {target} is skipped; the weights are in {self.out / 'checkpoints'}",
                              stacklevel=2)
                return target
            with (self.ema.applied(module) if self.ema is not None else contextlib.nullcontext()):
                exported = self.export_transform(module) if self.export_transform is not None else module
                guard.check_export(exported, target)
                datasets = tdata.card_datasets(self.train_sets, self.head_names, self.dataset_heads)
                exported.save_pretrained(target, metrics=card_metrics(metrics or {}), datasets=datasets,
                                         description=self.description)
        return target

    # --- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps``, validate, checkpoint and export; returns the last validation metrics."""
        try:
            return self._fit()
        finally:
            outdir.release(self.out, self.rank)

    def _fit(self) -> dict:
        c = self.config
        batches = tdata.batches_forever(self.loader)
        metrics: dict = self.metrics
        while self.step < c.max_steps:
            t0 = time.perf_counter()
            row = self.train_step(batches)
            self.step += 1
            row["atoms_per_s"] = row["atoms"] / max(time.perf_counter() - t0, 1e-9)
            self.logger.train(self.step, row, log=self.step % c.log_every == 0 or self.step == c.max_steps)
            last = self.step == c.max_steps
            if last and c.refit_e0.enabled:
                self.refit_e0()
            if self.valid_loader is not None and (self.step % c.valid_every == 0 or last):
                valid_loss, metrics = self.validate()
                self.metrics = metrics
                self.schedule.report(valid_loss)
                self.logger.valid(self.step, {"valid/loss": valid_loss, **flatten(metrics)})
                for hook in self.hooks:
                    hook(self, metrics)
            if self.step % c.checkpoint_every == 0 or last:
                self.save()
        if c.refit_e0.enabled and self.refit_summary is None:   # resumed a finished run: refit before exporting
            self.refit_e0()
        if not metrics and self.valid_loader is not None:   # resumed a finished run: measure before exporting
            metrics = self.validate()[1]
        self.export(metrics)
        self.engine.barrier()
        self.logger.close()
        return metrics


def _say(message: str) -> None:
    print(f"foundation: {message}", flush=True)


def _symbols(elements: list) -> list[str]:
    from ase.data import chemical_symbols
    return [chemical_symbols[int(e)] if str(e).isdigit() else str(e) for e in elements]


def run(config: TrainConfig, model=None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train per ``config`` (``model``: a ready module, else built from ``config.model``); returns the final
    validation metrics. ``resume=True`` continues from the latest checkpoint in ``out_dir`` if there is one;
    ``overwrite=True`` deletes an earlier run's checkpoints there first (without either, they are refused)."""
    return Trainer(config, model=model, resume=resume, overwrite=overwrite).fit()
