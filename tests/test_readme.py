"""The README's Python examples run exactly as written."""
import math
import re
from pathlib import Path

import pytest
import torch

from foundation import FoundationCalculator, FoundationModel, ModelConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_examples():
    blocks = _python_blocks()
    assert len(blocks) == 2 and "ModelConfig.preset" in blocks[0] and "VelocityVerlet" in blocks[1]


def test_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()


def test_md_example_runs(tmp_path, monkeypatch, capsys):
    """The MD block loads the demo's fine-tuned model directory: here a small model saved at the same path."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = ModelConfig.preset("student", elements=["Cu", "Au"], heads=["emt", "cuau"], dtype="float64")
    FoundationModel(config).save_pretrained(tmp_path / "runs" / "finetune_demo_cuau" / "model")
    namespace: dict = {}
    exec(compile(_python_blocks()[1], "README.md", "exec"), namespace)
    printed = [float(line.rsplit(":", 1)[1]) for line in capsys.readouterr().out.splitlines() if "(eV):" in line]
    assert len(printed) == 2 and all(map(math.isfinite, printed))
    atoms = namespace["atoms"]
    fresh = atoms.copy()
    fresh.calc = FoundationCalculator.from_pretrained("runs/finetune_demo_cuau/model", head="cuau", dtype="float64")
    assert printed[1] == pytest.approx(fresh.get_potential_energy() + atoms.get_kinetic_energy(), abs=1e-8)
