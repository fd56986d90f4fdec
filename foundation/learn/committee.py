"""Committees: K full models that share an architecture (and differ in seed or data order), saved and loaded as one.

``CommitteeModel(CommitteeConfig(member, size))`` holds ``size`` ``FoundationModel``s in ``members``; its state
dict is the members' under ``members.<k>.``, so a committee saves to one ``config.json`` + ``model.safetensors`` +
``README.md`` through the same ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as a model
(``config.json`` names the class, ``model_info.class = "CommitteeModel"``, and ``FoundationModel.from_pretrained``
of a committee directory or Hub id returns the committee). ``model_config`` is the member's ``ModelConfig`` dict
plus ``committee_size`` and ``recalibration``.

``forward`` returns the members' mean of every output (energy (B,) eV, forces (n,3) eV/Å, stress (B,3,3) eV/Å³
...) and the committee spread (population standard deviation over members, ddof 0):

- ``energy_uncertainty`` (B,) eV: s * std_k E_k;
- ``forces_uncertainty`` (n,) eV/Å: s * sqrt(mean_k |F_ik - mean_k F_ik|^2), per atom (norm over x, y, z);
- ``max_devi_f`` (B,) eV/Å: max over a structure's atoms of sqrt(mean_k |F_ik - mean F_i|^2) (DP-GEN's
  ``max_devi_f``, never recalibrated: trust levels refer to it);

with s = ``config.recalibration`` (1 unless fitted on validation data, ``calibration.fit_recalibration``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import keys
from ..hub import HubMixin
from ..model import FoundationModel, ModelConfig

ENERGY_UNCERTAINTY, FORCES_UNCERTAINTY, MAX_DEVI_F = keys.ENERGY_UNCERTAINTY, keys.FORCES_UNCERTAINTY, keys.MAX_DEVI_F
UNCERTAINTY_KEYS = (ENERGY_UNCERTAINTY, FORCES_UNCERTAINTY, MAX_DEVI_F)
_COMMITTEE_KEYS = ("committee_size", "recalibration")


@dataclass
class CommitteeConfig:
    """``member``: the shared ``ModelConfig``; ``size``: number of members K (>= 2); ``recalibration``: the factor
    s > 0 that multiplies ``energy_uncertainty`` and ``forces_uncertainty`` (fitted on validation data)."""
    member: ModelConfig
    size: int
    recalibration: float = 1.0

    def __post_init__(self) -> None:
        if int(self.size) < 2:
            raise ValueError(f"a committee needs at least 2 members to give an uncertainty, got size={self.size}; "
                             "set committee.size to 2 or more (4 is usual)")
        if not float(self.recalibration) > 0:
            raise ValueError(f"committee recalibration factor must be > 0, got {self.recalibration}")
        self.size, self.recalibration = int(self.size), float(self.recalibration)

    # what the calculator, the card and the loop read from a model's config, taken from the member
    r_max = property(lambda self: self.member.r_max)
    elements = property(lambda self: self.member.elements)
    heads = property(lambda self: self.member.heads)
    long_range = property(lambda self: self.member.long_range)

    def head_index(self, head: str | int | None) -> int:
        return self.member.head_index(head)

    def to_dict(self) -> dict:
        """The member's ``ModelConfig`` dict plus ``committee_size`` and ``recalibration`` (JSON-able)."""
        return {**self.member.to_dict(), "committee_size": self.size, "recalibration": self.recalibration}

    @classmethod
    def from_dict(cls, data: dict) -> CommitteeConfig:
        if not isinstance(data, dict) or "committee_size" not in data:
            raise ValueError("a committee's model_config needs 'committee_size' (this config.json describes a "
                             "single model: load it with FoundationModel.from_pretrained)")
        member = {k: v for k, v in data.items() if k not in _COMMITTEE_KEYS}
        return cls(ModelConfig.from_dict(member), data["committee_size"], data.get("recalibration", 1.0))


class CommitteeModel(HubMixin, nn.Module):
    """K ``FoundationModel``s with one architecture; ``forward`` gives their mean and spread (module docstring)."""

    config_class = CommitteeConfig

    def __init__(self, config: CommitteeConfig):
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(FoundationModel(config.member) for _ in range(config.size))

    @classmethod
    def from_members(cls, members: Sequence[FoundationModel], recalibration: float = 1.0) -> CommitteeModel:
        """A committee of trained models (copied); they must share one ``ModelConfig`` (ValueError naming the
        first member that differs)."""
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"a committee needs at least 2 members, got {len(members)}")
        first = members[0].config.to_dict()
        for k, m in enumerate(members[1:], 1):
            other = m.config.to_dict()
            diff = sorted(f for f in first if first[f] != other.get(f))
            if diff:
                raise ValueError(f"committee member {k} differs from member 0 in {diff}: members must share one "
                                 "architecture, element list, heads and statistics")
        committee = cls(CommitteeConfig(dataclasses.replace(members[0].config), len(members), recalibration))
        for slot, m in zip(committee.members, members):
            slot.load_state_dict(m.state_dict(), strict=True)
        ref = next(members[0].parameters())
        return committee.to(device=ref.device, dtype=ref.dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    def set_recalibration(self, factor: float) -> None:
        """Set the factor s that scales ``energy_uncertainty`` and ``forces_uncertainty`` (kept in config.json)."""
        self.config = dataclasses.replace(self.config, recalibration=float(factor))

    def member_outputs(self, batch, compute_forces: bool = True, compute_stress: bool = False) -> list[dict]:
        """Each member's outputs on ``batch`` (a list of K dicts as ``FoundationModel.forward`` returns)."""
        return [m(batch, compute_forces=compute_forces, compute_stress=compute_stress) for m in self.members]

    def forward(self, batch, compute_forces: bool = True, compute_stress: bool = False,
                training: bool = False) -> dict[str, torch.Tensor]:
        """Mean outputs and the uncertainties of the module docstring; ``training`` is not supported (train the
        members one by one, ``foundation.learn.loop``)."""
        if training:
            raise ValueError("a CommitteeModel is not trained as a whole: fine-tune each member (a FoundationModel) "
                             "and assemble them with CommitteeModel.from_members")
        outs = self.member_outputs(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return combine(outs, _graph_index(batch, outs[0]), self.config.recalibration)


def _graph_index(batch, out: dict) -> torch.Tensor:
    """(n,) structure index of every atom (zeros for a single ``Data``)."""
    index = getattr(batch, "batch", None)
    if index is None:
        n = out[keys.FORCES].shape[0] if keys.FORCES in out else int(batch[keys.ATOMIC_NUMBERS].shape[0])
        index = torch.zeros(n, dtype=torch.long)
    return index.to(out[keys.ENERGY].device)


def combine(outs: list[dict], graph_index: torch.Tensor, recalibration: float = 1.0) -> dict[str, torch.Tensor]:
    """Members' outputs -> {every common key: mean over members} + the uncertainties (module docstring).

    ``graph_index`` (n,) is the structure of each atom; ``recalibration`` scales the energy and force uncertainty.
    """
    common = [k for k, v in outs[0].items() if isinstance(v, torch.Tensor) and all(k in o for o in outs)]
    result = {k: torch.stack([o[k] for o in outs]).mean(0) for k in common}
    energies = torch.stack([o[keys.ENERGY] for o in outs])                           # (K, B)
    result[ENERGY_UNCERTAINTY] = recalibration * energies.std(0, unbiased=False)
    if keys.FORCES in result:
        forces = torch.stack([o[keys.FORCES] for o in outs])                          # (K, n, 3)
        devi = ((forces - result[keys.FORCES]) ** 2).sum(-1).mean(0).sqrt()          # (n,)
        result[FORCES_UNCERTAINTY] = recalibration * devi
        worst = torch.zeros_like(energies[0], dtype=devi.dtype)  # energies are float64 (E0), forces the model dtype
        result[MAX_DEVI_F] = worst.scatter_reduce(0, graph_index, devi, reduce="amax", include_self=False)
    return result
