"""The training loss: per-property coefficients, MSE or Huber, per-dataset weights, a coefficient schedule.

Every term is a weighted *sum* of errors over the labelled entries plus the *count* of labelled entries, so
that the engine can normalise by counts reduced over micro-batches and ranks (the gradient then equals the
gradient of the global-batch mean, whatever the atom counts per rank). Labels a structure lacks are NaN in the
batch (``keys.MISSING``); they are removed by boolean indexing before any arithmetic, so NaN never reaches a
gradient and a missing label is never treated as zero.

Terms (``w`` = weight of the structure's dataset):
- energy: sum_s w_s rho((E_pred - E_ref) / N_s), per atom, eV/atom; count = labelled structures
- forces: sum_i,a w rho(F_pred - F_ref), eV/Å per component; count = 3 x labelled atoms
- stress: per component, eV/Å³; count = 9 x labelled structures
- charges (e, per atom), dipole (e·Å, per component).
- charge_excess: sum_s w_s rho(sum_i q_raw,i - Q_s), e, a label-free term on the long-range head's raw charges
  (``keys.CHARGE_EXCESS``; target 0); count = structures. It teaches isolated molecules' raw charges to sum to
  their own charge, so that in a larger structure each fragment keeps its charge (``foundation.nn.charges``).
- hvp: sum_i,c w rho(H_pred v - H_ref v), eV/Å² per component of the k stored unit vectors (distillation);
  count = 3k x labelled atoms. ``predict_hvp`` adds the model's H v to the predictions (double backward,
  graph kept).
Any term can be switched off for the rest of a run (``switch_off``; ``state_dict`` carries it across a resume):
training hooks decide when (distillation stops H v matching once the student's forces are good enough).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import keys
from .config import LOSS_PROPERTIES, LossConfig

PER_ATOM = (keys.FORCES, keys.CHARGES, keys.HESSIAN_PRODUCTS)
LABEL_FREE = (keys.CHARGE_EXCESS,)   # model outputs pushed to 0: every structure counts, no label needed


def _label_mask(ref: Tensor) -> Tensor:
    """Rows of ``ref`` whose label is present: (rows,) bool (all components finite)."""
    return torch.isfinite(ref.reshape(ref.shape[0], -1)).all(dim=1)


def structure_of_atom(batch) -> Tensor:
    """(n,) int64 index of each atom's structure (``batch.batch`` of a ``Batch``; zeros for one ``Data``)."""
    index = getattr(batch, "batch", None)
    if index is None:
        return torch.zeros(batch[keys.ATOMIC_NUMBERS].shape[0], dtype=torch.long,
                           device=batch[keys.ATOMIC_NUMBERS].device)
    return index


def has_labels(batch, key: str) -> bool:
    """Whether any structure of ``batch`` carries label ``key`` (non-NaN)."""
    return key in batch and bool(_label_mask(batch[key]).any())


class Loss:
    """Callable loss for one run. ``properties`` are the ones with a non-zero coefficient at some step."""

    def __init__(self, config: LossConfig, max_steps: int):
        self.config = config
        self.max_steps = max_steps
        used = set(k for k, v in config.coefficients.items() if v > 0)
        for stage in config.schedule:
            used |= {k for k, v in stage.coefficients.items() if v > 0}
        self.properties = tuple(p for p in LOSS_PROPERTIES if p in used)
        if not self.properties:
            raise ValueError("loss.coefficients: every coefficient is zero; give e.g. {energy: 1, forces: 10}")
        self.switched_off: dict[str, int] = {}   # property -> optimizer step at which it was switched off

    def coefficients(self, step: int) -> Tensor:
        """(P,) coefficients at optimizer step ``step`` (0-based): base values, then each schedule stage whose
        ``start`` fraction of ``max_steps`` has been reached overrides its keys."""
        coeffs = dict(self.config.coefficients)
        for stage in sorted(self.config.schedule, key=lambda s: s.start):
            if step >= stage.start * self.max_steps:
                coeffs.update(stage.coefficients)
        for p in self.switched_off:
            coeffs[p] = 0.0
        return torch.tensor([float(coeffs.get(p, 0.0)) for p in self.properties], dtype=torch.float64)

    def needs_stress(self, batch=None) -> bool:
        """Whether the model must predict stress: the loss uses it (and ``batch``, if given, has stress labels)."""
        if keys.STRESS not in self.properties:
            return False
        return batch is None or has_labels(batch, keys.STRESS)

    def needs_hvp(self, coefficients: Tensor, batch=None) -> bool:
        """Whether H v must be predicted: the ``hvp`` coefficient is non-zero now (and ``batch`` has hvp labels)."""
        if keys.HESSIAN_PRODUCTS not in self.properties:
            return False
        if float(coefficients[self.properties.index(keys.HESSIAN_PRODUCTS)]) == 0.0:
            return False
        return batch is None or has_labels(batch, keys.HESSIAN_PRODUCTS)

    @staticmethod
    def predict_hvp(model, batch, create_graph: bool = True) -> Tensor:
        """(n, 3k) H v of the model (eV/Å²) for the batch's stored unit vectors (``keys.HESSIAN_VECTORS``, packed
        as in ``teacher.pack_vectors``); rows without vectors (NaN) use v = 0 and are masked by the loss."""
        v = batch[keys.HESSIAN_VECTORS]
        v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        n, m = v.shape
        hv = model.hessian_vector_product(batch, v.reshape(n, m // 3, 3).transpose(1, 2), create_graph=create_graph)
        return hv.transpose(1, 2).reshape(n, m)

    def switch_off(self, prop: str, step: int) -> None:
        """Set the coefficient of ``prop`` to 0 for the rest of the run, from optimizer step ``step`` on (kept in
        ``state_dict``, so across a resume). Training hooks decide when (e.g. distillation's H v matching)."""
        if prop not in self.properties:
            raise ValueError(f"loss term {prop!r} is not used in this run (terms: {self.properties})")
        self.switched_off.setdefault(prop, int(step))

    def state_dict(self) -> dict:
        return {"switched_off": dict(self.switched_off)}

    def load_state_dict(self, state: dict) -> None:
        self.switched_off = {str(k): int(v) for k, v in (state or {}).get("switched_off", {}).items()}

    def _weights(self, batch) -> Tensor:
        """(B,) per-structure weight from its dataset index (1 when no dataset weights are configured)."""
        idx = batch[keys.DATASET].reshape(-1)
        if self.config.dataset_weights is None:
            return torch.ones(idx.shape[0], device=idx.device, dtype=torch.float64)
        table = torch.tensor(self.config.dataset_weights, dtype=torch.float64, device=idx.device)
        return table[idx]

    def counts(self, batch) -> Tensor:
        """(P,) float64 number of labelled scalar entries per property in ``batch`` (no model needed)."""
        out = []
        for p in self.properties:
            if p in LABEL_FREE:
                out.append(float(batch[keys.NATOMS].reshape(-1).shape[0]))
                continue
            ref = batch[p] if p in batch else None
            if ref is None:
                out.append(0.0)
                continue
            mask = _label_mask(ref)
            per_row = ref[0].numel() if ref.dim() > 1 else 1
            out.append(float(mask.sum().item() * per_row))
        return torch.tensor(out, dtype=torch.float64)

    def _rho(self, diff: Tensor) -> Tensor:
        if self.config.kind == "huber":
            return torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction="none",
                                                  delta=self.config.huber_delta)
        return diff * diff

    def sums(self, pred: dict, batch) -> Tensor:
        """(P,) weighted error sums (differentiable w.r.t. ``pred``), float64."""
        w_struct = self._weights(batch)
        terms = []
        for p in self.properties:
            if p in LABEL_FREE:
                terms.append(self._label_free_term(p, pred, w_struct))
                continue
            if p not in batch or p not in pred:
                # H v is predicted only while its coefficient is non-zero (``needs_hvp``): absent = no term
                if p != keys.HESSIAN_PRODUCTS and p in batch and _label_mask(batch[p]).any():
                    raise ValueError(f"the batch has {p!r} labels but the model did not predict {p!r}; "
                                     f"set loss.coefficients.{p}: 0 or use a model with that output")
                terms.append(torch.zeros((), dtype=torch.float64, device=w_struct.device))
                continue
            ref = batch[p]
            mask = _label_mask(ref)
            if p in PER_ATOM:
                w = w_struct[structure_of_atom(batch)]
            else:
                w = w_struct
            y, t, w = pred[p].reshape(ref.shape)[mask], ref[mask], w[mask]
            diff = y.to(torch.float64) - t.to(torch.float64)
            if p == keys.ENERGY:
                diff = diff / batch[keys.NATOMS].reshape(-1)[mask].to(torch.float64)
            err = self._rho(diff).reshape(diff.shape[0], -1).sum(dim=1)
            terms.append((w * err).sum())
        return torch.stack(terms)

    def _label_free_term(self, p: str, pred: dict, w_struct: Tensor) -> Tensor:
        """sum_s w_s rho(pred[p]_s): a per-structure model output pushed towards 0."""
        if p not in pred:
            raise ValueError(f"loss.coefficients.{p} is set but the model does not output {p!r} (it comes from a "
                             "long-range charge head: model overrides long_range: {kind: coulomb} or "
                             "finetune.long_range); set it to 0 or add the head")
        err = self._rho(pred[p].reshape(w_struct.shape[0], -1).to(torch.float64)).sum(dim=1)
        return (w_struct * err).sum()

    @staticmethod
    def combine(sums: Tensor, counts: Tensor, coefficients: Tensor) -> Tensor:
        """Scalar loss sum_p c_p sums_p / counts_p (terms with no labelled entries contribute 0)."""
        coefficients = coefficients.to(sums.device)
        return (coefficients * sums / counts.to(sums.device).clamp(min=1.0)).sum()
