"""``foundation data list``: the small public datasets shipped in a source checkout's ``data/`` folder.

``data/catalog.json`` names each file with its dataset, split, structure count, level of theory, license and
source; the files live in the repository (not in the wheel). From an installed wheel the folder is absent and the
listing says where to get the data.
"""
from __future__ import annotations

import json
from pathlib import Path

CATALOG = "catalog.json"
SOURCES = ("rMD17: https://github.com/andersx/rmd17-npz (CC0); mlearn: https://github.com/materialsvirtuallab/mlearn "
           "(BSD-3-Clause); or a source checkout of this project, whose data/ folder holds both (xz-compressed "
           "extended XYZ)")


def data_dir() -> Path | None:
    """The checkout's ``data/`` folder when this package runs from a source checkout (it has the catalog)."""
    folder = Path(__file__).resolve().parents[2] / "data"
    return folder if (folder / CATALOG).is_file() else None


def catalog(folder: str | Path | None = None) -> list[dict]:
    """The catalog rows (name, split, path relative to the folder, structures, level_of_theory, license,
    license_file, source) of ``folder`` (default: the checkout's ``data/``); [] when there is none."""
    folder = Path(folder) if folder is not None else data_dir()
    if folder is None or not (folder / CATALOG).is_file():
        return []
    rows = json.loads((folder / CATALOG).read_text())["datasets"]
    return [dict(r, path=str(folder / r["path"])) for r in rows]


def listing(folder: str | Path | None = None) -> str:
    """What ``foundation data list`` prints: a table of the shipped datasets, or where to get them."""
    rows = catalog(folder)
    if not rows:
        return (f"no data/ folder with {CATALOG} here (an installed wheel does not ship the datasets). "
                f"Get them from {SOURCES}.")
    lines = [f"{'dataset':22s} {'split':6s} {'structures':>10s}  {'level of theory':16s} {'license':13s} path"]
    for r in rows:
        lines.append(f"{r['name']:22s} {r['split']:6s} {r['structures']:10d}  {r['level_of_theory']:16s} "
                     f"{r['license']:13s} {r['path']}")
    return "\n".join(lines)
