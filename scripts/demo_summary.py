"""Print the summary table of ``scripts/demo.sh``: errors, speeds and where the files are (reads what the run wrote)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _metrics(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    return json.loads(path.read_text()).get("metrics") or {} if path.is_file() else {}


def _rows(name: str, metrics: dict) -> list[tuple[str, str, str, str]]:
    """Rows from a card's metrics ({group: {"energy_per_atom_mae_meV_per_atom": ..., ...}}) or from the JSON
    of ``foundation evaluate`` ({"group/property": {"mae": ...}} in eV units); groups without E/F are skipped."""
    groups: dict[str, dict] = {}
    for key, values in metrics.items():
        if not isinstance(values, dict):
            continue
        if "mae" in values and "/" in key:  # evaluate JSON, SI-ish units (eV, eV/Å)
            group, prop = key.rsplit("/", 1)
            unit = {"energy_per_atom": "energy_per_atom_mae_meV_per_atom", "forces": "forces_mae_meV_per_A"}.get(prop)
            if unit and group != "all":
                groups.setdefault(group, {})[unit] = 1000.0 * values["mae"]
        else:
            groups[key] = values
    rows = []
    for group, values in sorted(groups.items()):
        e = values.get("energy_per_atom_mae_meV_per_atom")
        f = values.get("forces_mae_meV_per_A")
        if e is None and f is None:
            continue
        rows.append((name, group, "-" if e is None else f"{e:.2f}", "-" if f is None else f"{f:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--elapsed", type=int, default=None, help="wall seconds of the whole demo")
    args = parser.parse_args()
    runs = Path(args.runs)
    rows = _rows("pretrained (validation)", _metrics(runs / "pretrain_small" / "model"))
    zero_shot = runs / "pretrain_small" / "heldout_zero_shot.json"
    if zero_shot.is_file():
        rows += _rows("pretrained, zero-shot on Cu-Au", json.loads(zero_shot.read_text()))
    rows += _rows("fine-tuned on Cu-Au (validation)", _metrics(runs / "finetune_demo_cuau" / "model"))
    student = _metrics(runs / "distill_own_model" / "model").get("student vs teacher (held-out teacher labels)", {})
    if student:
        rows.append(("distilled student", "vs teacher, held-out frames",
                     f"{1000 * student['energy_per_atom_mae_eV_per_atom']:.2f}",
                     f"{1000 * student['forces_mae_eV_per_A']:.1f}"))
    print(f"{'model':34s} {'data / head':34s} {'E MAE meV/atom':>15s} {'F MAE meV/Å':>12s}")
    for row in rows:
        print(f"{row[0]:34s} {row[1]:34s} {row[2]:>15s} {row[3]:>12s}")
    report = runs / "distill_own_model" / "report.json"
    if report.is_file():
        speed = json.loads(report.read_text()).get("speed", {})
        print(f"\nstudent vs teacher (same structures, same run): {speed.get('student_atom_steps_per_s', 0):.0f} vs "
              f"{speed.get('teacher_atom_steps_per_s', 0):.0f} atom-steps/s, speed-up {speed.get('speedup', 0):.1f}x")
    md = runs / "md_summary.txt"
    if md.is_file():
        found = re.findall(r"[\d.]+ ns/day|[\d.]+ atom-steps/s", md.read_text())
        print("MD with the model pulled from the Hub:", ", ".join(found) or md.read_text().strip())
    print("\nfiles: data/demo (LMDB shards + manifest.json), runs/pretrain_small, runs/finetune_demo_cuau, "
          "runs/distill_own_model (model/ = config.json + model.safetensors + README.md card), runs/hub (Hub server "
          "storage), runs/md (trajectory and log)")
    if args.elapsed is not None:
        print(f"total wall time: {args.elapsed // 60} min {args.elapsed % 60} s")


if __name__ == "__main__":
    main()
