"""scripts/bench_mace_roundtrip.py without mace-torch: arguments, the EMT fine-tuning cells, and the deviation test
its table applies (a reference against itself passes, a stress off by more than the tolerance fails)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "interop" / "fixtures" / "trained" / "reference.json"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script(ROOT / "scripts" / "bench_mace_roundtrip.py")


def test_arguments(bench):
    args = bench.parse_args(["--mace-python", "/x/python"])
    assert args.finetune_steps == 4 and args.fixtures is None
    with pytest.raises(SystemExit):
        bench.parse_args([])


def test_emt_cells(bench, tmp_path):
    from ase.io import read
    frames = read(bench.emt_cells(tmp_path / "c.extxyz", count=3), ":")
    symbols = set(frames[0].get_chemical_symbols())
    assert len(frames) == 3 and "Au" in symbols and symbols <= {"Cu", "Au"}
    assert frames[0].get_stress().shape == (6,)


def test_deviation_test(bench):
    from bench_mace_import import max_deviations, within
    ref = json.loads(REFERENCE.read_text())
    assert max_deviations(ref, ref)["forces"][0] == 0.0 and within(max_deviations(ref, ref), "float64")
    off = copy.deepcopy(ref)
    off["batch"]["stress"][0][0][0] += 1e-7
    dev = max_deviations(ref, off)
    assert dev["stress"][0] == pytest.approx(1e-7) and not within(dev, "float64") and within(dev, "float32")
