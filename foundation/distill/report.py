"""The distillation report: speed student vs teacher, errors vs teacher and vs reference labels, NVE stability.

All measured in the run that made the student, on the same structures:
- speed: NVE MD (ASE velocity Verlet) with the teacher's calculator and the student's, alternated
  ``report.speed_repeats`` times on one structure (the largest seed x ``speed_supercell``); atom-steps/s of the
  best repeat of each (the least disturbed by other load on the machine);
- errors vs the teacher: MAE of the student on the held-out teacher-labelled configurations (energy per atom
  eV/atom, forces eV/Å and stress eV/Å³ per component, H v eV/Å² per component);
- errors vs reference labels (``seeds.reference``, e.g. a DFT test set): MAE of the student and of the teacher,
  and their force-MAE ratio;
- NVE stability: |Etot(end) - Etot(start)| / N of a student NVE run, final temperature, shortest distance.
``export`` writes ``report.json`` and the student (``save_pretrained``) whose card names the teacher, its
revision and the report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from .. import keys
from ..train.metrics import card_entry
from .seeds import plain, read_structures

SPEEDUP_TARGET, SPEEDUP_GOAL, FORCE_RATIO_TARGET = 10.0, 20.0, 1.2
NVE_STABLE_DRIFT = 0.01   # eV/atom: larger |dEtot| over the NVE run counts as unstable


def speed_structure(seeds: list[Atoms], supercell: list[int]) -> Atoms:
    """The largest fully periodic seed (else the largest seed) repeated ``supercell`` times."""
    periodic = [a for a in seeds if a.pbc.all()]
    if not periodic:
        return plain(max(seeds, key=len))
    return plain(max(periodic, key=len)).repeat(tuple(int(k) for k in supercell))


def measure_speed(teacher_calc, student_calc, atoms: Atoms, steps: int, repeats: int, temperature: float) -> dict:
    """Atom-steps/s of NVE MD with each calculator on copies of ``atoms``, alternated ``repeats`` times."""
    from ..md import run_md
    best = {"teacher": 0.0, "student": 0.0}
    runs: dict[str, list[float]] = {"teacher": [], "student": []}
    for r in range(repeats):
        for name, calc in (("teacher", teacher_calc), ("student", student_calc)):
            work = atoms.copy()
            work.calc = calc
            s = run_md(work, steps, temperature, "nve", seed=r)
            runs[name].append(s.atom_steps_per_s)
            best[name] = max(best[name], s.atom_steps_per_s)
            work.calc = None
    return {"structure": atoms.get_chemical_formula(), "atoms": len(atoms), "steps": steps, "repeats": repeats,
            "teacher_atom_steps_per_s": best["teacher"], "student_atom_steps_per_s": best["student"],
            "speedup": best["student"] / best["teacher"], "all_runs_atom_steps_per_s": runs,
            "torch_threads": torch.get_num_threads()}


@torch.no_grad()
def errors_vs_teacher(student, datasets: list, max_atoms: int) -> dict:
    """Student MAE on teacher-labelled datasets: energy_per_atom, forces, stress, hvp (those labelled)."""
    from ..train.data import make_eval_loader
    from ..train.loss import Loss, has_labels
    from ..train.metrics import MetricAccumulator
    acc = MetricAccumulator(["teacher"], ["all"])
    hv_abs, hv_n = 0.0, 0
    student.eval()
    for b in make_eval_loader(datasets, max_atoms, rank=0, world=1):
        b[keys.DATASET] = torch.zeros_like(b[keys.DATASET])
        b[keys.HEAD] = torch.zeros_like(b[keys.HEAD])
        pred = student(b, compute_forces=True, compute_stress=has_labels(b, keys.STRESS))
        acc.update(pred, b)
        if has_labels(b, keys.HESSIAN_PRODUCTS):
            hv = Loss.predict_hvp(student, b, create_graph=False).double()
            ref = b[keys.HESSIAN_PRODUCTS].double()
            mask = torch.isfinite(ref)
            hv_abs += float((hv[mask] - ref[mask]).abs().sum())
            hv_n += int(mask.sum())
    res = acc.result()
    out = {f"{p}_mae": res[f"all/{p}"]["mae"] for p in ("energy_per_atom", "forces", "stress") if f"all/{p}" in res}
    out["structures"] = int(res["all/energy"]["count"]) if "all/energy" in res else 0
    if hv_n:
        out["hvp_mae"] = hv_abs / hv_n
    return out


def _mae(pred: list[dict], ref: list[dict]) -> dict:
    """MAE of ``pred`` vs ``ref`` label dicts: energy per atom, forces and stress per component (where both exist)."""
    e, f, s = [], [], []
    for p, r in zip(pred, ref):
        n = len(r[keys.FORCES]) if keys.FORCES in r else len(p[keys.FORCES])
        if keys.ENERGY in p and keys.ENERGY in r:
            e.append(abs(float(p[keys.ENERGY]) - float(r[keys.ENERGY])) / n)
        if keys.FORCES in p and keys.FORCES in r:
            f.append(np.abs(np.asarray(p[keys.FORCES]) - r[keys.FORCES]).ravel())
        if keys.STRESS in p and keys.STRESS in r:
            s.append(np.abs(_full(p[keys.STRESS]) - _full(r[keys.STRESS])).ravel())
    out = {}
    if e:
        out["energy_per_atom_mae"] = float(np.mean(e))
    if f:
        out["forces_mae"] = float(np.mean(np.concatenate(f)))
    if s:
        out["stress_mae"] = float(np.mean(np.concatenate(s)))
    return out


def _full(stress) -> np.ndarray:
    from ase.stress import voigt_6_to_full_3x3_stress
    stress = np.asarray(stress, np.float64)
    return voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)


def errors_vs_reference(config, teacher, student_calc, log) -> dict | None:
    """Student and teacher MAE against the reference labels of ``seeds.reference`` (None without such files)."""
    from ..data.labels import read_labels
    files = [p for p in config.seeds.reference if Path(p).is_file()]
    if not files:
        if log and config.seeds.reference:
            log(f"report: reference files {config.seeds.reference} not found; no errors vs reference labels")
        return None
    structures = read_structures(files, config.seeds.max_reference, "reference")
    refs = [read_labels(a) for a in structures]
    structures = [plain(a) for a in structures]
    teacher_pred = teacher.label(structures, hvp_vectors=0, stress=True)
    student_pred = [{keys.ENERGY: r["energy"], keys.FORCES: r["forces"], **({keys.STRESS: r["stress"]} if "stress"
                     in r else {})} for r in student_calc.calculate_many(structures, config.report.max_atoms)]
    out = {"files": files, "structures": len(structures), "student": _mae(student_pred, refs),
           "teacher": _mae(teacher_pred, refs), "student_vs_teacher": _mae(student_pred, teacher_pred)}
    if "forces_mae" in out["student"] and out["teacher"].get("forces_mae"):
        out["force_mae_ratio"] = out["student"]["forces_mae"] / out["teacher"]["forces_mae"]
    return out


def nve_stability(student_calc, atoms: Atoms, steps: int, temperature: float, timestep: float) -> dict:
    """Student NVE run: energy drift per atom, final temperature, shortest distance, ``stable`` flag."""
    from ..md import run_md
    from .structures import min_distance
    work = atoms.copy()
    work.calc = student_calc
    s = run_md(work, steps, temperature, "nve", timestep_fs=timestep, seed=1)
    finite = bool(np.all(np.isfinite(work.get_forces())))
    dmin = min_distance(work)
    stable = finite and dmin > 0.5 and s.energy_drift_ev_per_atom < NVE_STABLE_DRIFT
    return {"steps": steps, "timestep_fs": timestep, "temperature_K": temperature, "atoms": len(work),
            "energy_drift_ev_per_atom": s.energy_drift_ev_per_atom, "final_temperature_K": s.final_temperature_k,
            "min_distance_A": dmin, "stable": stable, "stable_drift_limit_ev_per_atom": NVE_STABLE_DRIFT}


def build_report(config, teacher, student, seeds, source, valid_sets, metrics, datasets, hvp_off, log) -> dict:
    """The report dict (module doc)."""
    from ..calculator import FoundationCalculator
    rc = config.report
    student_calc = FoundationCalculator(student, dtype=rc.dtype)
    atoms = speed_structure(seeds, rc.speed_supercell)
    if log:
        log(f"report: speed of teacher and student on {atoms.get_chemical_formula()} ({len(atoms)} atoms)")
    speed = measure_speed(teacher.calculator, student_calc, atoms, rc.speed_steps, rc.speed_repeats,
                          rc.nve_temperature)
    vs_teacher = errors_vs_teacher(student, valid_sets, rc.max_atoms) if valid_sets else {}
    vs_ref = errors_vs_reference(config, teacher, student_calc, log)
    nve = nve_stability(student_calc, atoms, rc.nve_steps, rc.nve_temperature, rc.timestep) if rc.nve_steps else None
    checks = {"speedup_at_least_10x": speed["speedup"] >= SPEEDUP_TARGET,
              "speedup_at_least_20x": speed["speedup"] >= SPEEDUP_GOAL}
    if vs_ref and "force_mae_ratio" in vs_ref:
        checks["force_error_at_most_1.2x_teacher"] = vs_ref["force_mae_ratio"] <= FORCE_RATIO_TARGET
    return {"teacher": teacher.describe(), "student": {"config": student.config.to_dict(),
                                                        "parameters": student.num_parameters()},
            "seeds": {"source": source, "structures": len(seeds)}, "training_datasets": datasets,
            "hvp": {"vectors_per_structure": config.labels.hvp_vectors,
                    "coefficient": config.loss.coefficients.get(keys.HESSIAN_PRODUCTS, 0.0),
                    "off_at_force_mae": config.labels.hvp_off_at_force_mae,
                    "switched_off_at_step": hvp_off.get(keys.HESSIAN_PRODUCTS)},
            "validation_metrics": metrics, "speed": speed, "vs_teacher": vs_teacher, "vs_reference": vs_ref,
            "nve": nve, "checks": checks}


def _with_units(d: dict) -> dict:
    """{"forces_mae": eV/Å, ...} -> the card's {"forces_mae_meV_per_A": meV/Å, ...} (``card_entry``)."""
    return dict(card_entry(k.removesuffix("_mae"), "mae", v) for k, v in d.items() if k.endswith("_mae"))


def card_metrics(report: dict) -> dict:
    """The report's numbers in the card's {group: {metric_unit: float}} form."""
    sp = report["speed"]
    out = {f"distillation speed ({sp['structure']}, same run)": {
        "student_atom_steps_per_s": sp["student_atom_steps_per_s"],
        "teacher_atom_steps_per_s": sp["teacher_atom_steps_per_s"], "speedup": sp["speedup"]}}
    if report["vs_teacher"]:
        out["student vs teacher (held-out teacher labels)"] = _with_units(report["vs_teacher"])
    ref = report["vs_reference"]
    if ref:
        out["student vs reference labels"] = _with_units(ref["student"])
        out["teacher vs reference labels"] = _with_units(ref["teacher"])
        if "force_mae_ratio" in ref:
            out["student vs reference labels"]["force_mae_ratio_to_teacher"] = ref["force_mae_ratio"]
    if report["nve"]:
        n = report["nve"]
        out["student NVE stability"] = {"energy_drift_eV_per_atom": n["energy_drift_ev_per_atom"],
                                        "steps": float(n["steps"]), "stable": float(n["stable"])}
    return out


def export(config, student, teacher, report: dict, datasets: list[str], has_gt: bool, out: Path) -> Path:
    """``out/report.json`` and ``out/model`` (``save_pretrained``; the card names the teacher and its revision and
    carries the teacher model's license, e.g. an imported MACE model's)."""
    from ..data.manifest import read_manifest
    t = report["teacher"]
    rows = []
    for i, d in enumerate(datasets):
        m = read_manifest(d)
        gt = has_gt and i == 1
        rows.append({"name": m.get("name") or Path(d).name, "structures": m.get("num_structures"),
                     "level_of_theory": "reference labels of the seeds" if gt else f"teacher {t['name']} "
                                                                                   f"({t['revision']})",
                     "elements": m.get("elements")})
    sp = report["speed"]
    desc = (f"A student interatomic potential distilled with `foundation distill` from the teacher **{t['name']}** "
            f"(revision `{t['revision']}`) on teacher energies, forces, stresses and Hessian-vector products. "
            f"Measured in the distillation run on {sp['structure']} ({sp['atoms']} atoms): "
            f"{sp['student_atom_steps_per_s']:.4g} atom-steps/s vs the teacher's "
            f"{sp['teacher_atom_steps_per_s']:.4g} ({sp['speedup']:.3g}x).")
    ref = report["vs_reference"]
    if ref and "force_mae_ratio" in ref:
        desc += (f" Force MAE vs reference labels: student {ref['student']['forces_mae']:.4g} eV/Å, teacher "
                 f"{ref['teacher']['forces_mae']:.4g} eV/Å (ratio {ref['force_mae_ratio']:.3g}).")
    desc += " Full report: `distill_report.json`."
    target = out / "model"
    student.save_pretrained(target, metrics=card_metrics(report), datasets=rows, description=desc,
                            repo_id=config.name, license=teacher.license)
    text = json.dumps(report, indent=2, default=_json_default) + "\n"
    (target / "distill_report.json").write_text(text)
    (out / "report.json").write_text(text)
    return target


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def format_report(report: dict) -> str:
    """The printed report (plain text)."""
    sp, t = report["speed"], report["teacher"]
    lines = [f"teacher: {t['name']} ({t['revision']})",
             f"speed on {sp['structure']} ({sp['atoms']} atoms, NVE, best of {sp['repeats']}): student "
             f"{sp['student_atom_steps_per_s']:.4g} atom-steps/s, teacher {sp['teacher_atom_steps_per_s']:.4g} "
             f"atom-steps/s, speed-up {sp['speedup']:.3g}x"]
    if report["vs_teacher"]:
        lines.append("student vs teacher (held-out): " + _fmt(report["vs_teacher"]))
    ref = report["vs_reference"]
    if ref:
        lines.append(f"vs reference labels ({ref['structures']} structures): student " + _fmt(ref["student"]))
        lines.append("                                   teacher " + _fmt(ref["teacher"]))
        if "force_mae_ratio" in ref:
            lines.append(f"force MAE ratio student/teacher vs reference: {ref['force_mae_ratio']:.3g}")
    h = report["hvp"]
    lines.append(f"Hessian-vector matching: coefficient {h['coefficient']:g}, switched off at step "
                 f"{h['switched_off_at_step']}" if h["switched_off_at_step"] is not None else
                 f"Hessian-vector matching: coefficient {h['coefficient']:g}, never switched off")
    if report["nve"]:
        n = report["nve"]
        lines.append(f"student NVE: {n['steps']} steps at {n['temperature_K']:g} K, |dEtot| "
                     f"{n['energy_drift_ev_per_atom']:.3g} eV/atom, final T {n['final_temperature_K']:.0f} K, "
                     f"{'stable' if n['stable'] else 'UNSTABLE'}")
    lines.append("checks: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in report["checks"].items()))
    return "\n".join(lines)


def _fmt(d: dict) -> str:
    units = {"energy_per_atom_mae": "eV/atom", "forces_mae": "eV/Å", "stress_mae": "eV/Å³", "hvp_mae": "eV/Å²"}
    return ", ".join(f"{k} {v:.4g} {units[k]}" for k, v in d.items() if k in units)
