"""``ModelConfig``: the whole identity of a model (architecture, elements, cutoff, statistics, heads).

config.json (this dataclass as JSON) plus model.safetensors fully define a model. Statistics (reference
energies E0, scale, shift) are per head; E0 is a list over ``elements`` in eV.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase.data import atomic_numbers

from .. import __version__

DTYPES = ("float32", "float64")


@dataclass
class ModelConfig:
    """Hyperparameters of the MACE-style backbone. Lengths in Å, energies in eV.

    elements: chemical symbols in model order (index = row of the element weights).
    max_L: highest order of hidden features (0, 1, 2); max_ell: order of the edge spherical harmonics.
    correlation: body order - 1 of the product basis (1..3). num_poly_cutoff: p of the polynomial envelope.
    atomic_energies: {head: [E0 per element]}; scale/shift: {head: float}; None means 0 / 1 / 0 for every head.
    max_total_charge: 0 = no charge embedding; k > 0 embeds each structure's integer total charge in [-k, k] (e)
        into every atom's initial features, so that charged and neutral states of one geometry differ.
    energy_form: "faded" (isolated atoms get exactly E0, ``model.heads``) or "mace" (mace-torch's
        e_i = E0 + scale * (readouts + pair) + shift for every atom; imported mace models).
    first_interaction: "residual" (skip connection in every layer) or "plain" (mace's RealAgnosticInteractionBlock
        in layer 1: no skip, a per-element linear map after the message aggregation).
    interaction_norm: "average" (messages / avg_num_neighbors) or "density" (mace's Density blocks: a learned
        per-node density tanh(MLP(edge_feats)) summed over neighbours, messages / (density + 1)).
    distance_transform: None or {"kind": "agnesi", "q", "p", "a", "covalent_radii": [Å per element]}.
    pair_repulsion: None or {"kind": "zbl", "p", "a_exp", "a_prefactor", "c": [4], "covalent_radii": [Å per el.]}.
    long_range: None, or the long-range charge head's settings (``foundation.nn.charges.DEFAULTS``: kind
        "latent_ewald" | "coulomb", sigma, kcut, pme_threshold, ...); validated and filled with defaults.
    """

    elements: list[str]
    r_max: float = 6.0
    num_channels: int = 128
    max_L: int = 1
    max_ell: int = 3
    num_layers: int = 2
    correlation: int = 3
    num_bessel: int = 10
    num_poly_cutoff: int = 5
    radial_mlp: list[int] = field(default_factory=lambda: [64, 64, 64])
    readout_mlp: int = 16
    heads: list[str] = field(default_factory=lambda: ["default"])
    atomic_energies: dict[str, list[float]] | None = None
    scale: dict[str, float] | None = None
    shift: dict[str, float] | None = None
    avg_num_neighbors: float = 1.0
    dtype: str = "float64"
    long_range: dict | None = None
    max_total_charge: int = 0
    energy_form: str = "faded"
    first_interaction: str = "residual"
    interaction_norm: str = "average"
    distance_transform: dict | None = None
    pair_repulsion: dict | None = None
    foundation_version: str = __version__

    def __post_init__(self) -> None:
        self.elements = list(self.elements)
        self.heads = list(self.heads)
        self.radial_mlp = list(self.radial_mlp)
        zeros = [0.0] * len(self.elements)
        self.atomic_energies = _per_head(self.atomic_energies, self.heads, zeros, "atomic_energies")
        self.scale = _per_head(self.scale, self.heads, 1.0, "scale")
        self.shift = _per_head(self.shift, self.heads, 0.0, "shift")
        self.validate()

    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Check every field; raise ValueError saying which field is wrong and what is allowed."""
        _check(len(self.elements) > 0, "elements is empty; give the chemical symbols the model covers, e.g. ['H', 'O']")
        bad = [s for s in self.elements if s not in atomic_numbers or s == "X"]
        _check(not bad, f"elements contains unknown chemical symbols {bad}; use symbols such as 'H', 'Cu'")
        dup = sorted({s for s in self.elements if self.elements.count(s) > 1})
        _check(not dup, f"elements lists {dup} more than once; each element must appear once")
        _check(isinstance(self.r_max, (int, float)) and math.isfinite(self.r_max) and self.r_max > 0,
               f"r_max must be a positive cutoff in Å, got {self.r_max!r}")
        for name in ("num_channels", "num_layers", "num_bessel", "readout_mlp"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        _check(self.max_L in (0, 1, 2), f"max_L (hidden feature order) must be 0, 1 or 2, got {self.max_L!r}")
        _check(isinstance(self.max_ell, int) and self.max_L <= self.max_ell <= 3,
               f"max_ell must be an integer with max_L ({self.max_L}) <= max_ell <= 3, got {self.max_ell!r}")
        _check(self.correlation in (1, 2, 3), f"correlation must be 1, 2 or 3, got {self.correlation!r}")
        _check(isinstance(self.num_poly_cutoff, int) and self.num_poly_cutoff >= 2,
               f"num_poly_cutoff (p) must be an integer >= 2 for a smooth cutoff, got {self.num_poly_cutoff!r}")
        _check(all(isinstance(w, int) and w >= 1 for w in self.radial_mlp),
               f"radial_mlp must be a list of positive layer widths, got {self.radial_mlp!r}")
        _check(len(self.heads) > 0 and all(isinstance(h, str) and h for h in self.heads),
               f"heads must be a non-empty list of names, got {self.heads!r}")
        _check(len(set(self.heads)) == len(self.heads), f"heads contains duplicates: {self.heads}")
        for head, values in self.atomic_energies.items():
            _check(len(values) == len(self.elements) and all(_finite(v) for v in values),
                   f"atomic_energies[{head!r}] must list one finite energy (eV) per element "
                   f"({len(self.elements)}: {self.elements}), got {values!r}")
        for head in self.heads:
            _check(_finite(self.scale[head]) and self.scale[head] != 0, f"scale[{head!r}] must be finite and non-zero")
            _check(_finite(self.shift[head]), f"shift[{head!r}] must be finite")
        _check(_finite(self.avg_num_neighbors) and self.avg_num_neighbors > 0,
               f"avg_num_neighbors must be positive, got {self.avg_num_neighbors!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(isinstance(self.max_total_charge, int) and 0 <= self.max_total_charge <= 16,
               f"max_total_charge must be an integer 0..16 (0 = no charge embedding), got {self.max_total_charge!r}")
        for name, allowed in (("energy_form", ("faded", "mace")), ("first_interaction", ("residual", "plain")),
                              ("interaction_norm", ("average", "density"))):
            _check(getattr(self, name) in allowed, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        from ..nn.pair import check_distance_transform, check_pair_repulsion
        check_distance_transform(self.distance_transform, len(self.elements))
        check_pair_repulsion(self.pair_repulsion, len(self.elements))
        if self.long_range is not None:
            _check(isinstance(self.long_range, dict), f"long_range must be None or a dict, got {self.long_range!r}")
            from ..nn.charges import long_range_config
            self.long_range = long_range_config(self.long_range)  # defaults filled: config.json is explicit
        return self

    # ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (deep copy)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error naming the closest valid field."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a dict (JSON object), got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid fields: {names}"
                raise ValueError(f"unknown model config field {key!r}{hint}")
        if "elements" not in data:
            raise ValueError("model config has no 'elements'; list the chemical symbols the model covers")
        return cls(**json.loads(json.dumps(data)))

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelConfig:
        """From JSON text or a path to a config.json file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"model config file {path} not found; pass JSON text or a config.json path")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model config is not valid JSON ({err}); {str(text_or_path)[:80]!r}") from err
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, elements: list[str], **overrides: Any) -> ModelConfig:
        """A named preset (small, medium, large, student) for ``elements``, with field overrides."""
        from .presets import preset_fields
        fields = preset_fields(name)
        fields.update(overrides)
        fields["elements"] = list(elements)
        return cls.from_dict(fields)

    # ---------------------------------------------------------------------------------------------------
    @property
    def atomic_numbers(self) -> list[int]:
        """Atomic numbers of ``elements`` in model order."""
        return [atomic_numbers[s] for s in self.elements]

    def head_index(self, head: str | int | None) -> int:
        """Index of a head given by name (or index; None = the first head)."""
        if head is None:
            return 0
        if isinstance(head, int):
            _check(0 <= head < len(self.heads), f"head index {head} out of range for heads {self.heads}")
            return head
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; this model has heads {self.heads}")
        return self.heads.index(head)


def _per_head(value: Any, heads: list[str], default: Any, name: str) -> dict[str, Any]:
    """Normalise a per-head value: None -> default for all heads; a bare value -> the same for all heads."""
    if value is None:
        return {h: (list(default) if isinstance(default, list) else default) for h in heads}
    if not isinstance(value, dict):
        return {h: (list(value) if isinstance(value, (list, tuple)) else float(value)) for h in heads}
    missing = [h for h in heads if h not in value]
    extra = [h for h in value if h not in heads]
    _check(not missing and not extra, f"{name} must have exactly one entry per head {heads}; "
                                      f"missing {missing}, unexpected {extra}")
    return {h: (list(map(float, value[h])) if isinstance(value[h], (list, tuple)) else float(value[h])) for h in heads}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
