"""torch-sim: ``FoundationTorchSimModel``, a torch-sim ``ModelInterface`` over any ``foundation`` model.

    pip install 'foundation[torchsim]'          # torch-sim-atomistic

    import torch, torch_sim as ts
    from foundation import FoundationModel
    from foundation.integrations.torch_sim import FoundationTorchSimModel
    model = FoundationTorchSimModel(FoundationModel.from_pretrained("path/or/repo"), dtype=torch.float64)
    relaxed = ts.optimize(structures, model, optimizer=ts.frechet_cell_fire)   # structures: list of ase.Atoms
    final = ts.integrate(structures, model, integrator=ts.nvt_langevin, n_steps=1000, temperature=300,
                         timestep=0.002)                                       # ps (torch-sim metal units)

Several structures are one batched model call. The graph of a state is built as for the data loader and the ASE
calculator: per system, the neighbor list of ``foundation.data.graph.neighbor_list`` at the model's
``config.r_max`` (kept between steps at ``r_max + skin`` by ``calculator.SkinNeighborList``, which serves exactly
the list a fresh build gives), concatenated with atom offsets into one graph. Outputs: ``energy`` (B,) eV,
``forces`` (n,3) eV/Å, ``stress`` (B,3,3) eV/Å³ (ASE sign, as torch-sim expects: its barostats and cell filters
use virial = -V (stress + P)). A state without periodic boundaries gets zero stress (the model's rule).
"""
from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Batch

from .. import keys
from ..calculator import DTYPES, SkinNeighborList, inference_copy, select_head

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("foundation.integrations.torch_sim needs torch-sim: pip install 'foundation[torchsim]' "
                      "(PyPI package torch-sim-atomistic)") from exc


class FoundationTorchSimModel(ModelInterface):
    """A ``foundation`` model as a torch-sim model (``forward(state) -> {energy, forces, stress}``).

    ``model``: a ``FoundationModel`` (or a module with its call and ``config``); the wrapper works on its own copy
    on ``device`` in ``dtype`` (the model passed in is not changed). ``head``: readout head name (default: the
    first). ``skin`` (Å): neighbor-list skin kept between calls, one list per system slot of the state.
    ``compute_forces`` / ``compute_stress`` are fixed at construction (torch-sim's validator probes that).
    """

    def __init__(self, model: torch.nn.Module, *, head: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64, compute_forces: bool = True, compute_stress: bool = True,
                 skin: float = 0.5):
        super().__init__()
        self.model = inference_copy(model, device, dtype)
        self._device, self._dtype = torch.device(device), DTYPES[dtype]
        self._compute_forces, self._compute_stress = bool(compute_forces), bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff: cost grows with atoms x density
        self.head, self.head_index = select_head(self.model.config, head)
        self.r_max, self.skin = float(self.model.config.r_max), float(skin)
        self.neighbor_lists: list[SkinNeighborList] = []

    @classmethod
    def from_pretrained(cls, id_or_dir: str, *, revision: str | None = None, model_class: type | None = None,
                        **kwargs) -> FoundationTorchSimModel:
        """Load a model (Hub repo id or saved directory, ``FoundationModel.from_pretrained``) and wrap it."""
        if model_class is None:
            from ..model import FoundationModel as model_class
        return cls(model_class.from_pretrained(id_or_dir, revision=revision), **kwargs)

    @property
    def neighbor_builds(self) -> int:
        """Neighbor-list builds so far, summed over the system slots."""
        return sum(nl.builds for nl in self.neighbor_lists)

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        """state: a torch-sim ``SimState`` (or its dict) of B systems and n atoms -> energy (B,) eV, forces (n,3)
        eV/Å and stress (B,3,3) eV/Å³ as asked at construction, in this model's dtype and device."""
        if isinstance(state, dict):
            state = ts.SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        out = self.model(self.graph(state), compute_forces=self._compute_forces, compute_stress=self._compute_stress)
        results = {"energy": out[keys.ENERGY].to(self._dtype)}   # the model adds E0 in float64
        if self._compute_forces:
            results["forces"] = out[keys.FORCES]
        if self._compute_stress:
            results["stress"] = out[keys.STRESS]
        return results

    def graph(self, state) -> Batch:
        """The model input for a ``SimState``: one graph of all its systems (fields of ``foundation.keys``)."""
        positions = state.positions.detach()
        if not torch.isfinite(positions).all():
            bad = torch.unique(state.system_idx[~torch.isfinite(positions).all(dim=1)]).tolist()
            raise ValueError(f"positions of systems {bad} are not finite (NaN or inf): the simulation diverged "
                             "or the input is broken")
        cell = state.row_vector_cell.detach().to(device=self._device, dtype=self._dtype)  # (B,3,3), rows = vectors
        system = state.system_idx.to(self._device)
        counts = torch.bincount(system, minlength=state.n_systems)
        if system.numel() and bool((system[1:] < system[:-1]).any()):
            raise ValueError("state.system_idx must list each system's atoms together, in system order")
        pbc = np.broadcast_to(np.asarray(torch.as_tensor(state.pbc).cpu(), dtype=bool), (3,))
        edge_index, unit_shifts = self._neighbors(positions, cell, pbc, state.atomic_numbers, counts.tolist())
        shifts = torch.einsum("ei,eij->ej", unit_shifts, cell[system[edge_index[0]]])
        n_sys = state.n_systems
        charge = getattr(state, "charge", None)  # e per system, in torch-sim versions whose states carry it
        fields = {
            keys.POSITIONS: positions.to(device=self._device, dtype=self._dtype),
            keys.ATOMIC_NUMBERS: state.atomic_numbers.to(self._device),
            keys.CELL: cell, keys.PBC: torch.as_tensor(pbc.copy(), device=self._device).expand(n_sys, 3),
            keys.EDGE_INDEX: edge_index, keys.SHIFTS: shifts,
            keys.HEAD: torch.full((n_sys,), self.head_index, dtype=torch.long, device=self._device),
            keys.TOTAL_CHARGE: (torch.zeros(n_sys) if charge is None else charge.detach().reshape(n_sys)).to(
                device=self._device, dtype=self._dtype),
            "batch": system, "ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        }
        return Batch(**fields)

    def _neighbors(self, positions: torch.Tensor, cell: torch.Tensor, pbc: np.ndarray, numbers: torch.Tensor,
                   counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """edge_index (2,E) over the whole state and unit shifts (E,3), system after system (float64 lists)."""
        pos, cells, z = (positions.cpu().double().numpy(), cell.cpu().double().numpy(), numbers.cpu().numpy())
        while len(self.neighbor_lists) < len(counts):
            self.neighbor_lists.append(SkinNeighborList(self.r_max, self.skin))
        edges, units, start = [], [], 0
        for b, count in enumerate(counts):
            part = slice(start, start + count)
            edge_index, unit = self.neighbor_lists[b](pos[part], cells[b], pbc, z[part])
            edges.append(edge_index + start)
            units.append(unit)
            start += count
        edge_index = torch.from_numpy(np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64))
        unit = torch.from_numpy(np.concatenate(units) if units else np.zeros((0, 3)))
        return edge_index.to(self._device), unit.to(device=self._device, dtype=self._dtype)
