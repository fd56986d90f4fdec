"""CSV logs of a run (``train.csv``, ``valid.csv``): append rows with a fixed header, read columns back.

A leaf module (no project imports): the logger writes with it, the plots and the study scripts read with it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class CsvLog:
    """Append-only CSV with a header fixed by the first row (later unknown columns are dropped)."""

    def __init__(self, path, start_step: int):
        self.path, self.header = path, None
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.header = reader.fieldnames
                rows = [r for r in reader if int(r["step"]) <= start_step]
        with open(path, "w", newline="") as f:
            if self.header:
                w = csv.DictWriter(f, self.header)
                w.writeheader()
                w.writerows(rows)

    def write(self, row: dict) -> None:
        if self.header is None:
            self.header = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.header).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.header, extrasaction="ignore").writerow({k: _fmt(v) for k, v in row.items()})
            f.flush()


def _fmt(v):
    return repr(float(v)) if isinstance(v, float) else v


def read_csv(path) -> dict[str, np.ndarray]:
    """Columns of a log CSV as float arrays ({} when the file is missing or empty)."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}
