"""Teachers for distillation: label structures with energy, forces, stress and Hessian-vector products.

``load_teacher(spec)`` accepts two kinds of spec (plain JSON-able dicts, so a recipe can hold them):

- ``{"model": "<hub id or directory>", "revision": None, "dtype": None, "device": "cpu", "head": None,
  "max_atoms": 2048}``: one of our ``FoundationModel``s (``dtype`` "float32"/"float64" overrides the saved
  one, ``head`` picks a readout head, ``max_atoms`` caps a batch); H v by autograd
  (``model.hessian_vector_product``, double backward). Its revision is "<Hub commit or 'local'>@weights:<content
  digest of the weights>".
- ``{"calculator": "module.path:ClassName", "kwargs": {...}, "hvp_step": 1e-3}``: any ASE calculator (a class
  or a factory function returning one; or by name: ``emt``, ``gfn2-xtb``, ``sevennet-0``, ``pyscf``),
  revision "<distribution> <version>" of the package that provides it
  (e.g. ``sevenn.calculator:SevenNetCalculator`` with ``{"model": "7net-0"}``); H v by central finite
  differences of the forces along v: H v = -(F(x + h v) - F(x - h v)) / (2 h), h in Å (2 k extra force calls).

Both accept an optional ``name`` (for the model card). Labels of one structure (float64 numpy, ASE units), as
``read_labels`` returns them:
``energy`` () eV, ``forces`` (n,3) eV/Å, ``stress`` (3,3) eV/Å³ (only for cells periodic in all three
directions), ``hvp_vectors`` (n,3k) and ``hvp`` (n,3k) eV/Å² when k > 0 vectors are asked for.
Layout of the (n,3k) arrays: columns 3j..3j+2 hold vector j (``pack_vectors``/``unpack_vectors`` convert
to and from the (n,3,k) layout of ``FoundationModel.hessian_vector_product``). Each v is a unit vector in
R^{3n} (norm over the whole structure), drawn from a generator seeded by ``seed`` and a digest of the
structure, so the vectors of a structure do not depend on its position in a list or on chunking.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from .. import keys

DEFAULT_HVP_STEP = 1e-3  # Å, finite-difference step along a unit vector of R^{3n}
_CALC_KEYS = {"calculator", "kwargs", "hvp_step", "name"}
# Labellers by name (``{"calculator": "emt"}``): the class or factory each stands for, and its default kwargs.
NAMED_CALCULATORS = {
    "emt": ("ase.calculators.emt:EMT", {}),
    "gfn2-xtb": ("tblite.ase:TBLite", {"method": "GFN2-xTB", "verbosity": 0}),
    "sevennet-0": ("sevenn.calculator:SevenNetCalculator", {"model": "7net-0"}),
    "pyscf": ("foundation.learn.labellers:PySCFCalculator", {}),
}
_MODEL_KEYS = {"model", "revision", "dtype", "device", "head", "max_atoms", "name"}


def pack_vectors(v: np.ndarray | torch.Tensor):
    """(n,3,k) -> (n,3k) with columns 3j..3j+2 = vector j."""
    n, _, k = v.shape
    return v.transpose(1, 2).reshape(n, 3 * k) if isinstance(v, torch.Tensor) else \
        np.ascontiguousarray(np.swapaxes(v, 1, 2)).reshape(n, 3 * k)


def unpack_vectors(a: np.ndarray | torch.Tensor):
    """(n,3k) -> (n,3,k), the inverse of ``pack_vectors``."""
    n, m = a.shape
    if m % 3:
        raise ValueError(f"Hessian-vector array has {m} columns, not a multiple of 3 (expected (n, 3k))")
    return a.reshape(n, m // 3, 3).transpose(1, 2) if isinstance(a, torch.Tensor) else \
        np.swapaxes(a.reshape(n, m // 3, 3), 1, 2)


def structure_digest(atoms: Atoms) -> str:
    """Hex SHA-256 of a structure's numbers, positions (float64 bytes), cell and pbc."""
    h = hashlib.sha256()
    for a in (np.asarray(atoms.numbers, "<i8"), np.asarray(atoms.positions, "<f8"),
              np.asarray(atoms.cell.array, "<f8"), np.asarray(atoms.pbc, bool)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def random_unit_vectors(atoms: Atoms, k: int, seed: int) -> np.ndarray:
    """(n,3,k) float64: k Gaussian random directions, each normalised to 1 over all 3n components."""
    words = [int(seed) & 0xFFFFFFFF] + [int(structure_digest(atoms)[i:i + 8], 16) for i in range(0, 32, 8)]
    rng = np.random.default_rng(np.random.SeedSequence(words))
    v = rng.standard_normal((len(atoms), 3, k))
    return v / np.linalg.norm(v.reshape(-1, k), axis=0)


def _fully_periodic(atoms: Atoms) -> bool:
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 1e-8


class Teacher:
    """Base class: ``label``, ``calculator`` (an ASE calculator for MD) and ``describe()`` (model card / cache)."""

    kind = "teacher"
    license: str | None = None   # the teacher weights' license, inherited by the student's card (when known)

    def __init__(self, spec: Mapping[str, Any], name: str, revision: str):
        self.spec, self.name, self.revision = dict(spec), name, revision

    def describe(self) -> dict:
        """{"kind", "name", "revision", "spec"}: what produced the labels (JSON-able)."""
        return {"kind": self.kind, "name": self.name, "revision": self.revision, "spec": self.spec}

    def fingerprint(self) -> str:
        """Hex SHA-256 of ``describe()``: changes with the spec or the revision of the weights/package."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()

    @property
    def calculator(self):
        raise NotImplementedError

    def label(self, atoms_list: Sequence[Atoms], hvp_vectors: int | Sequence[np.ndarray] = 0, seed: int = 0,
              stress: bool = True) -> list[dict[str, np.ndarray]]:
        """Labels of each structure (see module doc). ``hvp_vectors``: k random unit vectors per structure, or
        one (n,3,k) array per structure. ``stress`` is computed for fully periodic cells only."""
        vectors = self._vectors(atoms_list, hvp_vectors, seed)
        return self._label(list(atoms_list), vectors, stress)

    def _label(self, atoms_list, vectors, stress):
        raise NotImplementedError

    @staticmethod
    def _vectors(atoms_list, hvp_vectors, seed) -> list[np.ndarray | None]:
        if isinstance(hvp_vectors, (int, np.integer)):
            if hvp_vectors < 0:
                raise ValueError(f"hvp_vectors must be >= 0, got {hvp_vectors}")
            return [random_unit_vectors(a, int(hvp_vectors), seed) if hvp_vectors else None for a in atoms_list]
        vectors = [np.asarray(v, dtype=np.float64) for v in hvp_vectors]
        if len(vectors) != len(atoms_list):
            raise ValueError(f"got {len(vectors)} vector arrays for {len(atoms_list)} structures; give one each")
        for i, (a, v) in enumerate(zip(atoms_list, vectors)):
            if v.ndim != 3 or v.shape[:2] != (len(a), 3):
                raise ValueError(f"structure {i}: HVP vectors have shape {v.shape}, expected ({len(a)}, 3, k)")
        return vectors


class CalculatorTeacher(Teacher):
    """Any ASE calculator; H v by central finite differences of the forces (step ``hvp_step`` Å).

    Stress is labelled when the calculator lists "stress" in ``implemented_properties``."""

    kind = "calculator"

    def __init__(self, spec: Mapping[str, Any]):
        path, kwargs = spec["calculator"], dict(spec.get("kwargs") or {})
        if isinstance(path, str) and path.lower() in NAMED_CALCULATORS:   # a labeller by name: emt, gfn2-xtb ...
            path, defaults = NAMED_CALCULATORS[path.lower()]
            kwargs = {**defaults, **kwargs}
        cls = _import_object(path)
        try:
            self._calc = cls(**kwargs)
        except Exception as exc:
            raise ValueError(f"teacher calculator {path}(**{kwargs}) could not be created: {exc}") from exc
        self.step = float(spec.get("hvp_step", DEFAULT_HVP_STEP))
        if not self.step > 0:
            raise ValueError(f"teacher hvp_step must be > 0 Å, got {self.step}")
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
        super().__init__(spec, spec.get("name") or f"{path}({args})", _package_version(path))

    @property
    def calculator(self):
        return self._calc

    def _forces(self, atoms: Atoms, positions: np.ndarray) -> np.ndarray:
        atoms.positions = positions
        return np.asarray(atoms.get_forces(), dtype=np.float64)

    def _label(self, atoms_list, vectors, stress):
        out = []
        for i, (src, v) in enumerate(zip(atoms_list, vectors)):
            atoms = src.copy()
            self._calc.reset()  # no state (e.g. a cached neighbour list) from earlier structures: same bits anywhere
            atoms.calc = self._calc
            x0 = atoms.positions.copy()
            rec = {keys.ENERGY: np.asarray(atoms.get_potential_energy(), np.float64).reshape(()),
                   keys.FORCES: np.asarray(atoms.get_forces(), np.float64).reshape(len(atoms), 3)}
            if stress and _fully_periodic(atoms) and "stress" in self._calc.implemented_properties:
                rec[keys.STRESS] = np.asarray(atoms.get_stress(voigt=False), np.float64).reshape(3, 3)
            if v is not None:
                hv = np.empty_like(v)
                for j in range(v.shape[2]):
                    d = self.step * v[:, :, j]
                    hv[:, :, j] = -(self._forces(atoms, x0 + d) - self._forces(atoms, x0 - d)) / (2 * self.step)
                rec[keys.HESSIAN_VECTORS], rec[keys.HESSIAN_PRODUCTS] = pack_vectors(v), pack_vectors(hv)
            for name, value in rec.items():
                if not np.all(np.isfinite(value)):
                    raise ValueError(f"teacher {self.name} gave non-finite {name} for structure {i} "
                                     f"({src.get_chemical_formula()}); check the structure (atoms too close?)")
            atoms.calc = None
            out.append(rec)
        return out


class ModelTeacher(Teacher):
    """One of our ``FoundationModel``s (Hub id or directory); forces/stress/H v by autograd, batched."""

    kind = "foundation"

    def __init__(self, spec: Mapping[str, Any]):
        from ..hub import resolve_model_dir
        from ..model import FoundationModel
        source, revision = str(spec["model"]), spec.get("revision")
        model_dir = resolve_model_dir(source, revision)
        self.device = torch.device(spec.get("device") or "cpu")
        self.model = FoundationModel.from_pretrained(model_dir, device=self.device)
        self.license = (getattr(self.model, "hub_metadata", None) or {}).get("license")
        weights_sha = weights_digest(self.model)
        if spec.get("dtype"):
            dtypes = {"float32": torch.float32, "float64": torch.float64}
            if spec["dtype"] not in dtypes:
                raise ValueError(f"teacher dtype {spec['dtype']!r} is not one of {sorted(dtypes)}")
            self.model = self.model.to(dtypes[spec["dtype"]])
        self.max_atoms = int(spec.get("max_atoms", 2048))
        self.head = spec.get("head")
        self.head_index = self.model.config.head_index(self.head)
        commit = model_dir.name if re.fullmatch(r"[0-9a-f]{40}", model_dir.name) else None
        rev = f"{commit or revision or 'local'}@weights:{weights_sha[:16]}"
        super().__init__(spec, spec.get("name") or source, rev)
        self._calc = None

    @property
    def calculator(self):
        if self._calc is None:
            from ..calculator import FoundationCalculator
            self._calc = FoundationCalculator(self.model, head=self.model.config.heads[self.head_index],
                                              dtype=str(self.model.dtype).replace("torch.", ""),
                                              device=str(self.device))
        return self._calc

    def _chunks(self, atoms_list):
        chunk, n = [], 0
        for i, a in enumerate(atoms_list):
            if chunk and n + len(a) > self.max_atoms:
                yield chunk
                chunk, n = [], 0
            chunk.append(i)
            n += len(a)
        if chunk:
            yield chunk

    def _label(self, atoms_list, vectors, stress):
        from torch_geometric.data import Batch

        from ..data.graph import from_atoms
        ks = {v.shape[2] for v in vectors if v is not None}
        if len(ks) > 1 or (ks and any(v is None for v in vectors)):
            raise ValueError(f"all structures must have the same number of HVP vectors, got {sorted(ks)}")
        out: list[dict] = [{} for _ in atoms_list]
        r_max = self.model.config.r_max
        for idx in self._chunks(atoms_list):
            graphs = [from_atoms(atoms_list[i], r_max, with_labels=False, head=self.head_index,
                                 dtype=self.model.dtype) for i in idx]
            batch = Batch.from_data_list(graphs).to(self.device)
            pred = self.model(batch, compute_forces=True, compute_stress=stress)
            ptr = batch.ptr.cpu().numpy()
            hv = None
            if ks:
                v = torch.from_numpy(np.concatenate([vectors[i] for i in idx]))
                hv = self.model.hessian_vector_product(batch, v.to(self.device)).double().cpu().numpy()
            for b, i in enumerate(idx):
                lo, hi = ptr[b], ptr[b + 1]
                rec = out[i]
                rec[keys.ENERGY] = pred[keys.ENERGY][b].double().cpu().numpy().reshape(())
                rec[keys.FORCES] = pred[keys.FORCES][lo:hi].double().cpu().numpy()
                if stress and _fully_periodic(atoms_list[i]):
                    rec[keys.STRESS] = pred[keys.STRESS][b].double().cpu().numpy()
                if hv is not None:
                    rec[keys.HESSIAN_VECTORS] = pack_vectors(vectors[i])
                    rec[keys.HESSIAN_PRODUCTS] = pack_vectors(hv[lo:hi])
        return out


def weights_digest(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a model's weights (names, dtypes, shapes, bytes; sorted by name) and its config.

    A content digest: the same weights give the same digest however the file was written (the bytes of a
    safetensors file are not reproducible: its metadata order varies between saves)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _import_object(path: str):
    """``module.path:Name`` -> the object (``ValueError`` saying how to fix a bad path or a missing package)."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"teacher calculator {path!r} must be 'module.path:ClassName' (a class or a factory "
                         f"returning an ASE calculator), e.g. 'ase.calculators.emt:EMT', or one of the names "
                         f"{sorted(NAMED_CALCULATORS)}")
    module, name = path.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"teacher calculator module {module!r} cannot be imported ({exc}); install the package "
                         f"that provides it (e.g. `pip install {module.split('.')[0]}`)") from exc
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ValueError(f"module {module!r} has no {name!r}; check the teacher calculator path {path!r}") from None


def _package_version(path: str) -> str:
    """'<distribution> <version>' of the package providing ``path`` (the revision of a calculator teacher)."""
    import importlib.metadata as md
    top = path.split(":")[0].split(".")[0]
    dists = md.packages_distributions().get(top) or [top]
    try:
        return f"{dists[0]} {md.version(dists[0])}"
    except md.PackageNotFoundError:
        return f"{top} (version unknown)"


def load_teacher(spec: Mapping[str, Any]) -> Teacher:
    """A ``Teacher`` from a spec (see module doc). Unknown keys are an error naming the key."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"teacher spec must be a mapping, got {type(spec).__name__}")
    if ("model" in spec) == ("calculator" in spec):
        raise ValueError(f"teacher spec needs exactly one of 'model' (hub id or directory of a FoundationModel) or "
                         f"'calculator' ('module.path:ClassName'); got keys {sorted(spec)}")
    try:
        json.dumps(dict(spec), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"teacher spec must be plain JSON (strings, numbers, lists, dicts): it is recorded in the "
                         f"model card and hashed into the label-cache key ({exc})") from None
    allowed = _MODEL_KEYS if "model" in spec else _CALC_KEYS
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"teacher spec has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return ModelTeacher(spec) if "model" in spec else CalculatorTeacher(spec)
