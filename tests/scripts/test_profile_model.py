"""scripts/profile_model.py: the profiler tables of our model on bench_model's Cu cell are written."""
from __future__ import annotations

from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_model.py"


def test_profile_writes_module_ranges(load_script, tmp_path):
    profile = load_script(SCRIPT)
    out = tmp_path / "prof.txt"
    assert profile.main(["--preset", "small", "--L", "0", "--calls", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## L=0:" in text and "atom-steps/s" in text
    assert "## interactions.0" in text and "## products.0" in text   # forward ranges of submodules
