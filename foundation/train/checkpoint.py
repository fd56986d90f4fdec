"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/            one complete checkpoint
        meta.json             step, world size, ZeRO stage, config, scheduler, sampler position, file list,
                              SHA-256 of every other file (``resumable`` falls back past a damaged checkpoint)
        model.safetensors     training weights (rank 0)
        ema.json/.safetensors EMA state (rank 0)
        model/                save_pretrained export of the EMA weights (config.json, model.safetensors, README)
        rank_00000.json/.safetensors   per-rank state: optimizer (its ZeRO partition), RNG states
    latest                    text file naming the newest complete checkpoint; replaced last, atomically

A checkpoint is written into ``step_XXXXXXXX.tmp`` by all ranks, then (after a barrier) rank 0 writes
``meta.json``, fsyncs, renames the directory and finally swaps ``latest`` with ``os.replace``. A crash at
any point leaves the previous ``latest`` pointing at a complete checkpoint; stale ``.tmp`` directories are
removed by the next save. Nested Python state (optimizer state dicts, RNG tuples) is stored as a JSON
skeleton whose tensors live in a safetensors file (``to_tree`` / ``from_tree``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
LATEST = "latest"


# --- nested state <-> (JSON skeleton, flat tensors) ----------------------------------------------------------
def to_tree(obj, tensors: dict | None = None, path: str = "s") -> tuple[object, dict]:
    """JSON-serialisable skeleton of ``obj`` and the tensors it references ({name: CPU tensor}).

    Supports dicts (any int/str keys), lists, tuples, tensors, numpy arrays, numbers, strings, None, dtypes.
    Anything else is a ``ValueError`` naming where in the state it was found.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": name}, tensors
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}, tensors
    if isinstance(obj, np.generic):
        return obj.item(), tensors
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}, tensors
    if isinstance(obj, dict):
        items = [[to_tree(k, tensors, f"{path}.key")[0], to_tree(v, tensors, f"{path}.{k}")[0]] for k, v in obj.items()]
        return {"__dict__": items}, tensors
    if isinstance(obj, (list, tuple)):
        items = [to_tree(v, tensors, f"{path}[{i}]")[0] for i, v in enumerate(obj)]
        return (items if isinstance(obj, list) else {"__tuple__": items}), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise ValueError(f"cannot checkpoint {type(obj).__name__} at {path}: only tensors, arrays, numbers, strings, "
                     "lists, tuples and dicts are stored (no pickle)")


def from_tree(skeleton, tensors: dict):
    """Inverse of ``to_tree``."""
    if isinstance(skeleton, list):
        return [from_tree(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return np.asarray(skeleton["__ndarray__"], dtype=skeleton["dtype"])
    if "__dtype__" in skeleton:
        return getattr(torch, skeleton["__dtype__"])
    if "__tuple__" in skeleton:
        return tuple(from_tree(v, tensors) for v in skeleton["__tuple__"])
    return {from_tree(k, tensors): from_tree(v, tensors) for k, v in skeleton["__dict__"]}


def save_tree(obj, stem: Path) -> None:
    """Write ``obj`` to ``stem.json`` + ``stem.safetensors`` (both fsynced)."""
    skeleton, tensors = to_tree(obj)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    _write_text(stem.with_suffix(".json"), json.dumps(skeleton))
    _fsync(stem.with_suffix(".safetensors"))


def load_tree(stem: Path):
    """Read what ``save_tree`` wrote. FileNotFoundError names the missing file."""
    for suffix in (".json", ".safetensors"):
        if not stem.with_suffix(suffix).is_file():
            raise FileNotFoundError(f"checkpoint file {stem.with_suffix(suffix)} is missing; the checkpoint is "
                                    "incomplete: delete it and point 'latest' at an earlier step")
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return from_tree(json.loads(stem.with_suffix(".json").read_text()), tensors)


# --- RNG ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA when present) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- atomic directories ---------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    """Empty ``step_XXXXXXXX.tmp`` under ``root`` (call on rank 0 before the barrier that precedes writing)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / (step_name(step) + ".tmp")
    tmp.mkdir()
    return tmp


def commit(root: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written into the staging dir: write meta.json, rename, repoint ``latest``
    (atomically, last), then delete all but the newest ``keep`` checkpoints. Returns the final directory."""
    tmp, final = root / (step_name(step) + ".tmp"), root / step_name(step)
    meta = dict(meta, format_version=FORMAT_VERSION, step=step,
                files=sorted(p.name for p in tmp.iterdir()) + ["meta.json"], sha256=checksums(tmp))
    _write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    for p in tmp.rglob("*"):
        _fsync(p)
    if final.exists():                      # re-saving a step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    _write_text(root / (LATEST + ".tmp"), final.name + "\n")
    os.replace(root / (LATEST + ".tmp"), root / LATEST)
    _fsync(root)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    # Checkpoints of later steps than this one are left by an earlier run in the same out_dir (a fresh start
    # overwrites it): they are not this run's and must not push the one just written out of the ``keep`` newest.
    stale = [p for p in done if p.name > final.name]
    mine = [p for p in done if p.name <= final.name]
    for old in stale + mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checksums(directory: Path) -> dict[str, str]:
    """{path relative to ``directory``: SHA-256 hex digest} of every file under it (``meta.json`` excluded)."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file() and p.name != "meta.json":
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[p.relative_to(directory).as_posix()] = digest.hexdigest()
    return out


def damage(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (missing meta.json or file, a file whose SHA-256
    differs from the one recorded when it was written), or None when it is intact. Checkpoints written before
    checksums were recorded are checked for missing files only."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc})"
    missing = [f for f in meta.get("files", []) if not (path / f).exists()]
    if missing:
        return f"missing {missing}"
    recorded = meta.get("sha256")
    if recorded is None:
        return None
    actual = checksums(path)
    bad = sorted(f for f, h in recorded.items() if actual.get(f) != h)
    return f"checksum mismatch in {bad} (truncated or modified)" if bad else None


def resumable(root: Path, log=print) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if it is intact, else the newest intact earlier
    one (saying which was skipped and why, through ``log``); None when ``root`` holds none. A ``ValueError``
    lists the damage when no checkpoint is intact."""
    root = Path(root)
    pointer = root / LATEST
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        steps = [named] + [p for p in steps if p.name < named.name]
    elif not steps:
        return None
    damaged = []
    for path in steps:
        why = damage(path) if path.is_dir() else "directory missing"
        if why is None:
            if damaged and log is not None:
                log(f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}); resuming from the previous intact "
                    f"checkpoint {path.name} instead" + (f" (also skipped {[d[0] for d in damaged[1:]]})"
                                                          if len(damaged) > 1 else ""))
            return path
        damaged.append((path.name, why))
    raise ValueError(f"no intact checkpoint under {root} to resume from: "
                     + "; ".join(f"{n}: {w}" for n, w in damaged)
                     + "; start again with --overwrite")


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    meta = path / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no meta.json; the checkpoint directory "
                                "was removed or damaged: point 'latest' at another step_* directory")
    missing = [f for f in json.loads(meta.read_text())["files"] if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing {missing}; point 'latest' at another step_* directory")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def save_module(module: torch.nn.Module, path: Path) -> None:
    """A module's state_dict as safetensors (tensors cloned to CPU, so shared storage is fine)."""
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}, str(path))


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load weights saved by ``save_module`` strictly (a missing or unexpected key is an error)."""
    state = load_file(str(path))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model (missing {result.missing_keys}, unexpected "
                         f"{result.unexpected_keys}); resume with the same model configuration")
