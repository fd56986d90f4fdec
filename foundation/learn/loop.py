"""The steps of one active-learning iteration, each resumable on its own: label frames (the distillation label
cache, failures recorded), fine-tune the K committee members on every label so far (``foundation.finetune``), and
measure a model or committee on held-out test structures."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms

from .. import keys
from ..recipe import to_dict
from ..train.config import training_keys
from .config import LearnConfig

Log = Callable[[str], None]


def write_json(path: Path, value) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_frames(path: Path, frames: list[Atoms]) -> None:
    """extxyz (info and any SinglePointCalculator results kept), atomically."""
    from ase.io import write
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def read_frames(path: Path) -> list[Atoms]:
    from ase.io import read
    return list(read(path, ":", format="extxyz")) if path.stat().st_size else []


# --- labels ----------------------------------------------------------------------------------------------------
def label(config: LearnConfig, teacher, frames: list[Atoms], cache_dir: Path, log: Log | None) -> dict:
    """Label ``frames`` (cached; failures recorded, the loop goes on): {"dataset": dir or None, "labelled",
    "failed": [{"frame", "error"}], "seconds": labeller wall time (summed over its shards)}."""
    from ..data.manifest import read_manifest
    from ..distill.label_cache import NoLabels, label_frames
    if not frames:
        return {"dataset": None, "labelled": 0, "failed": [], "seconds": 0.0}
    stress = config.loss.coefficients.get(keys.STRESS, 0.0) > 0
    try:
        directory = label_frames(teacher, frames, cache_dir, hvp_vectors=0, seed=config.seed, stress=stress,
                                 shard_size=1, r_max=6.0, log=None, tolerate_failures=True)
    except NoLabels as exc:
        if log:
            log(f"labelling: {exc}")
        return {"dataset": None, "labelled": 0, "failed": exc.failures, "seconds": float("nan")}
    manifest = read_manifest(directory)
    seconds = sum(float(s.get("labelling_seconds") or 0.0) for s in manifest["shards"])
    failed = manifest.get("failed", [])
    if failed and log:
        log(f"labelling: {len(failed)} of {len(frames)} frames failed to label (first: {failed[0]['error']})")
    return {"dataset": str(directory), "labelled": int(manifest["num_structures"]), "failed": failed,
            "seconds": seconds}


# --- committee training ------------------------------------------------------------------------------------------
def member_config(config: LearnConfig, base_dir: str, datasets: list[str], out_dir: Path, seed: int):
    """The ``FinetuneConfig`` of one member: the recipe's training keys on ``datasets`` (all labels so far), E0
    refitted, the readout copied or fresh (``committee.head_init``). Without ``replay`` the base is fine-tuned in
    place (strategy full); with it, strategy replay: a new head ``committee.head`` on the labels and the base head
    on a sample of ``replay.data`` (which must be resolved by then: ``run.resolve_replay``)."""
    from ..finetune.config import FinetuneConfig
    values = to_dict(training_keys(config))
    values.pop("model")
    values["data"].update(train=list(datasets), heads=None, weights=None)
    finetune = {"strategy": "full", "head_init": config.committee.head_init, "add_elements": False,
                "cache_dir": str(out_dir / "data")}
    if config.replay is not None:
        finetune.update(strategy="replay", head=config.committee.head)
        values["replay"] = to_dict(config.replay)
    values.update(out_dir=str(out_dir), seed=int(seed), finetune=finetune,
                  base={"model": str(base_dir), "revision": config.base.revision if config.base.model else None,
                        "head": config.base.head})
    return FinetuneConfig.from_dict(values)


def train_committee(config: LearnConfig, base_dir: str, datasets: list[str], directory: Path, log: Log | None):
    """Fine-tune K members (seeds ``seed * 1000 + k``) from the base on ``datasets``; a member whose model is
    already exported is reused (resume). Returns (``CommitteeModel``, training seconds, summed over members)."""
    from ..finetune.run import finetune
    from ..model import FoundationModel
    from .committee import CommitteeModel
    members, seconds = [], 0.0
    for k in range(config.committee.size):
        out = directory / f"member-{k}"
        done = out / "model" / "config.json"
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)   # a member killed mid-training starts again
            t0 = time.perf_counter()
            finetune(member_config(config, base_dir, datasets, out, config.seed * 1000 + k), log=lambda _: None)
            write_json(out / "training.json", {"seconds": time.perf_counter() - t0})
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            if log:
                log(f"  member {k}: fine-tuned on {len(datasets)} label sets in "
                    f"{time.perf_counter() - t0:.1f} s")
        seconds += json.loads((out / "training.json").read_text())["seconds"]
        members.append(FoundationModel.from_pretrained(out / "model"))
    return CommitteeModel.from_members(members), seconds


def load_or_train_committee(config, base_dir, datasets, directory: Path, log) -> tuple:
    """The committee saved in ``directory/model``, or trained (``train_committee``) and saved there."""
    from .committee import CommitteeModel
    saved = directory / "model"
    if (saved / "config.json").is_file():
        seconds = sum(json.loads((directory / f"member-{k}" / "training.json").read_text())["seconds"]
                      for k in range(config.committee.size))
        return CommitteeModel.from_pretrained(saved), seconds
    committee, seconds = train_committee(config, base_dir, datasets, directory, log)
    tmp = directory / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    committee.save_pretrained(tmp, description=f"A committee of {config.committee.size} models fine-tuned by "
                              f"`foundation learn`{replayed(config)}; its calculator reports energy_uncertainty, "
                              "forces_uncertainty and max_devi_f.")
    os.replace(tmp, saved)
    return committee, seconds


def replayed(config: LearnConfig) -> str:
    """A card phrase: which head the labels trained and what the base head replayed ('' without replay)."""
    if config.replay is None:
        return ""
    r = config.replay
    return (f" (head `{config.committee.head}` on the labels; the base head on a replay sample of "
            f"{r.samples or 'all'} structures of {', '.join(map(str, r.data))}, weight {r.weight:g})")


# --- test error ---------------------------------------------------------------------------------------------------
def test_metrics(model, structures: list[Atoms], head: str | None = None) -> dict:
    """Errors of ``model`` (a model or a committee: its mean) on labelled ``structures``: energy MAE (meV/atom),
    force MAE and RMSE (meV/Å); for a committee also the Spearman correlation and miscalibration area of its
    force uncertainty against the true force error (``calibration``)."""
    from ..calculator import FoundationCalculator
    from ..data.labels import read_labels
    from .calibration import calibration_report
    calc = FoundationCalculator(model, head=head, dtype="float64")
    results = calc.calculate_many(list(structures), max_atoms=1024)
    de, df, sigma = [], [], []
    for atoms, res in zip(structures, results):
        true = read_labels(atoms)
        de.append((res["energy"] - float(true[keys.ENERGY])) / len(atoms))
        df.append(res["forces"] - true[keys.FORCES])
        sigma.append(res.get(keys.FORCES_UNCERTAINTY))
    df = np.concatenate(df)
    out = {"structures": len(structures), "energy_mae_meV_per_atom": 1000 * float(np.mean(np.abs(de))),
           "force_mae_meV_per_A": 1000 * float(np.mean(np.abs(df))),
           "force_rmse_meV_per_A": 1000 * float(np.sqrt(np.mean(df ** 2)))}
    if sigma[0] is not None:
        cal = calibration_report(np.concatenate(sigma), np.linalg.norm(df, axis=1), df)
        out.update(spearman=cal["spearman"], miscalibration_area=cal["miscalibration_area"],
                   mean_force_uncertainty_meV_per_A=1000 * cal["mean_uncertainty"])
    return out
