"""The shipped datasets: the catalog matches the files, `foundation data list` shows them, licenses are present."""
from pathlib import Path

import pytest

from foundation.cli import main
from foundation.data.catalog import catalog, data_dir, listing
from foundation.data.readers import read_atoms

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def test_catalog_lists_every_shipped_file_with_its_license():
    rows = catalog()
    assert data_dir() == REPO_DATA
    assert {Path(r["path"]).name for r in rows} == {p.name for p in REPO_DATA.glob("*/*.xyz.xz")}
    assert len(rows) == 28
    for r in rows:
        assert Path(r["path"]).is_file() and (REPO_DATA / r["license_file"]).is_file()
        assert r["license"] in ("CC0-1.0", "BSD-3-Clause") and r["split"] in ("train", "test")


@pytest.mark.parametrize("name", ["rmd17-ethanol/test", "mlearn-Si/train", "mlearn-Li/test"])
def test_catalog_counts_are_the_files_counts(name):
    dataset, split = name.split("/")
    (row,) = [r for r in catalog() if r["name"] == dataset and r["split"] == split]
    assert len(read_atoms(row["path"])) == row["structures"]


def test_data_list_command(capsys, tmp_path):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "rmd17-aspirin" in out and "mlearn-Si" in out and "CC0-1.0" in out and "PBE/def2-SVP" in out
    assert "where" not in listing(REPO_DATA) and "get them from" in listing(tmp_path).lower()
