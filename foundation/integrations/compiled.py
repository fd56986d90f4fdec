"""``torch.compile`` of one head of a ``FoundationModel`` for fast small-system inference (MD of a molecule).

``compile_model(model, head=None)`` returns a ``CompiledModel``: called like the model, ``compiled(batch,
compute_forces=True, compute_stress=False)``, it returns the model's outputs dict (``energy`` (B,) eV, ``energies``
(n,) eV, ``forces`` (n,3) eV/Å, with stress also ``stress`` (B,3,3) eV/Å³ and ``virials`` (B,3,3) eV).

What is compiled is the differentiable part only: positions (n,3) Å, strain, shifts (E,3) Å -> per-atom energies
(n,), the computation of the TorchScript artifact (``scripted.ShortRange.energies``: folded weights, nodes sorted by
element, padded neighbour table). The data-dependent preparation (element order and slices, the padded table and its
width K, ``.tolist()``) runs eagerly before, so the compiled graph has no graph break; forces and stress come from
``torch.autograd.grad`` outside it, so AOTAutograd compiles the backward too. With ``dynamic=True`` the edge count E
and the neighbour-table width K are dynamic dimensions (``maybe_mark_dynamic``): an MD step with other E, K reuses
the compiled code; the atom count and per-element counts are specialised (guards), so a new composition or switching
stress on/off compiles again (fully symbolic shapes, ``torch.compile(dynamic=True)``, traced 4x slower).

Not covered (ValueError): the long-range head, the total-charge embedding, and imported mace-torch components that
the artifact lacks (``artifact.check_scriptable``). Inference only (no create_graph).
"""
from __future__ import annotations

import torch
from e3nn.o3._spherical_harmonics import _spherical_harmonics
from torch import Tensor, nn

from .. import keys
from ..model import derivatives
from ..model.inference import inference_copy, select_head
from .scripted import ShortRange


class EnergyCore(nn.Module):
    """The compiled function: positions and prepared tables -> per-atom energies (n,) eV (no Python-side data
    dependence, so ``torch.compile(fullgraph=True)`` accepts it)."""

    def __init__(self, short_range: ShortRange):
        super().__init__()
        self.short_range = short_range
        self.short_range.sh.sph_func = _spherical_harmonics  # plain Python: dynamo cannot trace a ScriptFunction
        # per-element node slices (element, start, stop): an attribute, so that dynamo specialises on the
        # composition (a guard on its value) instead of tracing symbolic slice bounds
        self.slices: tuple[tuple[int, int, int], ...] = ()

    def forward(self, pos: Tensor, sym: Tensor, shifts: Tensor, batch: Tensor, z: Tensor, sender: Tensor,
                receiver: Tensor, order: Tensor, rank: Tensor, index: Tensor, send: Tensor) -> Tensor:
        """pos (n,3) Å, sym (B,3,3) symmetric strain (zeros; a grad leaf for stress), shifts (E,3) Å, batch (n,),
        z (n,) element index, sender/receiver (E,), ``ShortRange.prepare``'s tables with send shaped (n, K)."""
        pos_s = pos + torch.einsum("ni,nij->nj", pos, sym[batch])
        shifts_s = shifts + torch.einsum("ei,eij->ej", shifts, sym[batch[sender]])
        vectors = pos_s[receiver] - pos_s[sender] + shifts_s
        charge = pos.new_zeros(pos.shape[0])
        energy, _ = self.short_range.energies(z, vectors, receiver, charge, order, rank, index, send.reshape(-1),
                                              send.shape[1], list(self.slices))
        return energy


class CompiledModel(nn.Module):
    """One head of a ``FoundationModel`` in ``dtype`` with its energy compiled by ``torch.compile``.

    ``backend``: 'inductor' (C++ code, the fast one) or e.g. 'aot_eager' (no code generation: checks tracing
    and exactness quickly). The first call of each new guard set compiles (seconds to a minute on CPU).
    """

    def __init__(self, model, head: str | None = None, dtype: str | None = None, backend: str = "inductor",
                 dynamic: bool = True, device: str | torch.device = "cpu"):
        super().__init__()
        from .artifact import check_scriptable
        config = model.config
        check_scriptable(config)
        if model.long_range is not None or config.max_total_charge > 0:
            raise ValueError("compile_model does not cover the long-range head or the total-charge embedding; "
                             "use the eager model (or the TorchScript artifact)")
        self.config = config
        self.head, head_index = select_head(config, head)
        copy = inference_copy(model, device, dtype or config.dtype)
        self.dtype = copy.dtype
        self.register_buffer("element_index", copy.element_index.clone())
        self.core = EnergyCore(ShortRange(copy, head_index))
        self.dynamic = dynamic
        self.compiled = torch.compile(self.core, backend=backend, dynamic=None if dynamic else False, fullgraph=True)

    def tables(self, z: Tensor, sender: Tensor, receiver: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eager, data-dependent preparation: (order (n,), rank (n,), index (E,), send (n, K)); sets the core's
        slices. The edge count E and the width K are marked dynamic (one compiled graph for every MD step)."""
        order, rank, slices, index, send, k = self.core.short_range.prepare(z, sender, receiver)
        self.core.slices = tuple(slices)
        send = send.view(z.shape[0], k)
        if self.dynamic:
            torch._dynamo.maybe_mark_dynamic(index, 0)
            torch._dynamo.maybe_mark_dynamic(send, 1)
        return order, rank, index, send

    def forward(self, batch, compute_forces: bool = True, compute_stress: bool = False) -> dict[str, Tensor]:
        """``batch``: a PyG Batch/Data of ``foundation.data.from_atoms`` graphs -> the model's outputs dict."""
        pos = batch[keys.POSITIONS].to(self.dtype).detach().requires_grad_(compute_forces)
        z = self.element_index[batch[keys.ATOMIC_NUMBERS]]
        if bool((z < 0).any()):
            raise ValueError(f"the batch has elements this model does not know; it covers {self.config.elements}")
        edge_index = batch[keys.EDGE_INDEX]
        sender, receiver = edge_index[0], edge_index[1]
        n = pos.shape[0]
        vec = getattr(batch, "batch", None)
        vec = torch.zeros(n, dtype=torch.long, device=pos.device) if vec is None else vec
        cell = batch[keys.CELL].to(self.dtype).view(-1, 3, 3)
        pbc = batch[keys.PBC].view(-1, 3)
        displacement = torch.zeros_like(cell).requires_grad_(compute_stress)
        sym = 0.5 * (displacement + displacement.transpose(1, 2))
        shifts = batch[keys.SHIFTS].to(self.dtype)
        if self.dynamic:
            for edge_tensor, dim in ((shifts, 0), (sender, 0), (receiver, 0)):
                torch._dynamo.maybe_mark_dynamic(edge_tensor, dim)
        with torch.enable_grad():
            node_energy = self.compiled(pos, sym, shifts, vec, z, sender, receiver, *self.tables(z, sender, receiver))
        energy = torch.zeros(cell.shape[0], dtype=self.dtype, device=pos.device).index_add(0, vec, node_energy)
        out = {keys.ENERGY: energy.detach(), keys.NODE_ENERGY: node_energy.detach()}
        if compute_forces or compute_stress:
            forces, stress, virials = derivatives.forces_and_stress(
                energy, pos, displacement if compute_stress else None, cell, pbc, create_graph=False)
            out[keys.FORCES] = forces.detach()
            if compute_stress:
                out[keys.STRESS], out[keys.VIRIALS] = stress.detach(), virials.detach()
        return out


def compile_model(model, head: str | None = None, dtype: str | None = None, backend: str = "inductor",
                  dynamic: bool = True, device: str | torch.device = "cpu") -> CompiledModel:
    """``CompiledModel(model, head, dtype, backend, dynamic, device)``: see the module docstring; the batch must be
    on ``device`` (inductor generates C++ on CPU, Triton on CUDA; measured on CPU only). ``model`` is not changed."""
    return CompiledModel(model, head, dtype, backend, dynamic, device)
