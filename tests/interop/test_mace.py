"""``foundation import mace`` on bad input: a clear error naming the problem, and nothing written to --out."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ase import Atoms
from safetensors.torch import load_file, save_file

from foundation.calculator import FoundationCalculator
from foundation.cli import main as cli
from foundation.interop.mace import import_mace
from foundation.interop.mace_hyper import UnsupportedMace
from foundation.model.backbone import FoundationModel

FIXTURE = Path(__file__).parent / "fixtures" / "mp0"


def _copy(tmp_path: Path) -> Path:
    dump = tmp_path / "dump"
    shutil.copytree(FIXTURE, dump)
    return dump


def _edit_hyper(dump: Path, edit) -> None:
    hyper = json.loads((dump / "hyper.json").read_text())
    edit(hyper)
    (dump / "hyper.json").write_text(json.dumps(hyper))


def _fails(dump, out, match, exc=ValueError, **kwargs):
    with pytest.raises(exc, match=match):
        import_mace(dump, out, **kwargs)
    assert not out.exists(), "a failed import must leave nothing at --out"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left"


def test_unknown_mace_version(tmp_path):
    dump = _copy(tmp_path)
    _edit_hyper(dump, lambda h: h["versions"].update(mace="0.2.1"))
    _fails(dump, tmp_path / "out", "mace-torch 0.2.1.*0.3.x", license="mit")


def test_unsupported_component_is_named(tmp_path):
    dump = _copy(tmp_path)
    _edit_hyper(dump, lambda h: h["interactions"][1].update({"class": "RealAgnosticAttResidualInteractionBlock"}))
    _fails(dump, tmp_path / "out", "RealAgnosticAttResidualInteractionBlock", UnsupportedMace, license="mit")
    dump2 = _copy(tmp_path / "b")
    _edit_hyper(dump2, lambda h: h["radial"].update(basis="GaussianBasis"))
    _fails(dump2, tmp_path / "out", "GaussianBasis", UnsupportedMace, license="mit")


def test_missing_and_misshapen_tensors(tmp_path):
    dump = _copy(tmp_path)
    tensors = load_file(str(dump / "model.safetensors"))
    key = "interactions.1.linear_up.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(dump / "model.safetensors"))
    _fails(dump, tmp_path / "out", key, license="mit")
    tensors[key] = torch.zeros(7, dtype=torch.float64)
    save_file(tensors, str(dump / "model.safetensors"))
    _fails(dump, tmp_path / "out", key, license="mit")
    (dump / "hyper.json").unlink()
    _fails(dump, tmp_path / "out", "hyper.json is missing", license="mit")


def test_license_required_and_recorded(tmp_path):
    _fails(FIXTURE, tmp_path / "out", "--license is required")
    out = import_mace(FIXTURE, tmp_path / "ok", license="ASL (academic only)")
    assert "ASL (academic only)" in (out / "README.md").read_text()
    card = json.loads((out / "config.json").read_text())
    assert card["provenance"]["family"].startswith("ScaleShiftMACE") and card["license"] == "ASL (academic only)"


def test_element_outside_the_table(tmp_path):
    model = FoundationModel.from_pretrained(import_mace(FIXTURE, tmp_path / "m", license="mit"))
    atoms = Atoms("FeCu", positions=[[0, 0, 0], [0, 0, 2.2]])
    atoms.calc = FoundationCalculator(model)
    with pytest.raises(ValueError, match=r"\['Fe'\].*does not know"):
        atoms.get_potential_energy()


def test_model_file_needs_a_mace_python(tmp_path, capsys):
    fake = tmp_path / "x.model"
    fake.write_bytes(b"not a pickle we would ever open")
    _fails(fake, tmp_path / "out", "--mace-python", license="mit")
    # a python without mace-torch (this one): the dumper stops before reading the file
    _fails(fake, tmp_path / "out", "cannot import mace-torch", license="mit", mace_python=sys.executable)
    assert cli(["import", "mace", str(fake), "--out", str(tmp_path / "out"), "--license", "mit",
                "--mace-python", str(tmp_path / "nowhere" / "python")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_out_must_be_new(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        import_mace(FIXTURE, out, license="mit")
    assert (out / "keep.txt").read_text() == "x"


def test_imported_model_extends_elements(tmp_path):
    """Fine-tuning surgery on an imported density/ZBL/Agnesi model: a new element leaves old predictions intact."""
    from foundation.finetune.surgery import extend_elements
    model = FoundationModel.from_pretrained(import_mace(FIXTURE.parent / "mp0b3", tmp_path / "m", license="mit"))
    bigger = extend_elements(model, ["Fe"])
    assert bigger.config.pair_repulsion["covalent_radii"][-1] == pytest.approx(1.32)
    atoms = Atoms("CuAuO", positions=[[0, 0, 0], [0, 0, 2.0], [1.5, 0, 1.0]])
    energies = []
    for m in (model, bigger):
        atoms.calc = FoundationCalculator(m)
        energies.append(atoms.get_potential_energy())
    assert abs(energies[0] - energies[1]) < 1e-10
    assert bigger.hub_metadata["license"] == "mit"
