"""save_pretrained / from_pretrained / push_to_hub and the model card, locally and through a Hub-protocol server.

The Hub tests run the real ``huggingface_hub`` client in subprocesses (``HF_ENDPOINT``/``HF_HUB_OFFLINE`` are read
when it is imported) against ``foundation.hubserver`` started here on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from foundation.calculator import FoundationCalculator
from foundation.hub import WEIGHTS_NAME, read_config, sha256_file
from foundation.hubserver import serve_in_thread

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_calculator import PairModel, _one_torch_thread, cu_au_bulk, pair_model  # noqa: E402,F401

METRICS = {"rmd17-ethanol": {"energy_mae_meV_per_atom": 1.234, "forces_mae_meV_per_A": 20.5}}
DATASETS = [{"name": "rmd17-ethanol", "structures": 1000, "level_of_theory": "PBE/def2-SVP", "license": "CC0"}]


def _predict(model):
    atoms = cu_au_bulk()
    atoms.calc = FoundationCalculator(model)
    return atoms.get_potential_energy(), atoms.get_forces()


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_save_load_roundtrip_gives_identical_predictions(tmp_path):
    model = pair_model(seed=3)
    out = model.save_pretrained(tmp_path / "m", metrics=METRICS, datasets=DATASETS)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["framework"]["name"] == "foundation" and cfg["framework"]["format_version"] == 1
    assert cfg["files"] == {WEIGHTS_NAME: sha256_file(out / WEIGHTS_NAME)}
    assert cfg["model_config"] == model.config.to_dict()
    assert cfg["model_info"]["parameters"] == sum(p.numel() for p in model.parameters())
    loaded = PairModel.from_pretrained(out)
    e0, f0 = _predict(model)
    e1, f1 = _predict(loaded)
    assert e0 == e1 and np.array_equal(f0, f1)
    assert loaded.hub_metadata == {"metrics": METRICS, "datasets": DATASETS}
    loaded.save_pretrained(tmp_path / "again")  # card inputs survive load -> save
    assert json.loads((tmp_path / "again" / "config.json").read_text())["metrics"] == METRICS


def test_saving_the_same_weights_twice_gives_identical_files(tmp_path):
    """Byte-identical saves: a re-push of an unchanged model must not create a new Hub commit."""
    model = pair_model(seed=5)
    dirs = [model.save_pretrained(tmp_path / f"s{i}", metrics=METRICS, datasets=DATASETS) for i in range(6)]
    for name in ("model.safetensors", "config.json"):
        assert len({(d / name).read_bytes() for d in dirs}) == 1, name
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_calculator import pair_model; "
            "pair_model(seed=5).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other"), str(TESTS)], check=True)
    assert (tmp_path / "other" / WEIGHTS_NAME).read_bytes() == (dirs[0] / WEIGHTS_NAME).read_bytes()


def test_card_has_real_content_and_never_invents_metrics(tmp_path):
    model = pair_model()
    card = (model.save_pretrained(tmp_path / "a", metrics=METRICS, datasets=DATASETS, repo_id="org/cu-au")
            / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "foundation" and meta["license"] == "mit" and "interatomic-potential" in meta["tags"]
    assert meta["datasets"] == ["rmd17-ethanol"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "rmd17-ethanol"
    assert {m["type"]: m["value"] for m in result["metrics"]} == METRICS["rmd17-ethanol"]
    n_params = sum(p.numel() for p in model.parameters())
    for needle in ("| elements | Cu, Au |", "| cutoff r_max | 4 Å |", f"| parameters | {n_params:,} |",
                   "`pbe`, `r2scan`", "| rmd17-ethanol | 1,000 | PBE/def2-SVP | CC0 |",
                   "| rmd17-ethanol | forces_mae_meV_per_A | 20.5 |", "## Intended use and limits",
                   'FoundationCalculator.from_pretrained("org/cu-au"', "@software{foundation"):
        assert needle in card, needle
    assert not re.search(r"\{\{\w+\}\}", card)  # every placeholder filled
    bare = (model.save_pretrained(tmp_path / "b") / "README.md").read_text()
    assert "Not evaluated" in bare and "model-index" not in _front_matter(bare)
    assert "Not recorded" in bare and "20.5" not in bare


def test_card_says_what_acts_beyond_the_cutoff_and_whether_charge_is_an_input():
    from foundation.card import _long_range_text
    plain = _long_range_text(None, None)
    assert "no long-range charge head" in plain and "not an input" in plain
    ewald = _long_range_text({"kind": "latent_ewald", "sigma": 1.5}, 2)
    assert "latent Ewald / PME" in ewald and "1.5 Å" in ewald and "-2 to +2 e" in ewald
    coulomb = _long_range_text({"kind": "coulomb", "sigma": 1.0}, None)
    assert "molecules only" in coulomb and "fixes the sum of the latent charges" in coulomb


@pytest.mark.parametrize("elements", [["Cu", "Au"], ["H", "C", "O"], ["Si"], ["H"], ["Tc", "Re"], ["Li", "F"]])
def test_card_example_structure_uses_only_the_model_elements(elements):
    from foundation.card import _example_structure
    imp, build = _example_structure(elements)
    scope: dict = {}
    exec(imp + "\n" + build, scope)
    atoms = scope["atoms"]
    assert len(atoms) >= 1 and set(atoms.get_chemical_symbols()) <= set(elements)
    if elements == ["H", "C", "O"]:
        assert "molecule" in imp  # an organic model gets a molecule, not diamond


def test_update_card_records_evaluation_metrics_without_touching_weights(tmp_path):
    from foundation.hub import update_card
    out = pair_model().save_pretrained(tmp_path / "m")
    digest = sha256_file(out / WEIGHTS_NAME)
    assert "Not evaluated" in (out / "README.md").read_text()
    update_card(out, metrics=METRICS, datasets=DATASETS, repo_id="org/cu-au")
    update_card(out, metrics={"mlearn-Cu": {"energy_mae_meV_per_atom": 3.5}})
    card = (out / "README.md").read_text()
    results = _front_matter(card)["model-index"][0]["results"]
    assert [r["dataset"]["name"] for r in results] == ["rmd17-ethanol", "mlearn-Cu"]
    assert "| mlearn-Cu | energy_mae_meV_per_atom | 3.5 |" in card and "Not evaluated" not in card
    assert sha256_file(out / WEIGHTS_NAME) == digest
    assert PairModel.from_pretrained(out).hub_metadata["metrics"]["mlearn-Cu"] == {"energy_mae_meV_per_atom": 3.5}


def test_weights_are_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    out = pair_model().save_pretrained(tmp_path / "m")
    raw = (out / WEIGHTS_NAME).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"} and "w" in header

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    PairModel.from_pretrained(out)


def test_corrupted_missing_newer_and_mismatched_checkpoints_are_refused(tmp_path):
    out = pair_model().save_pretrained(tmp_path / "m")
    weights, config = out / WEIGHTS_NAME, out / "config.json"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="corrupted or was modified"):
        PairModel.from_pretrained(out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        PairModel.from_pretrained(out)
    weights.write_bytes(good)
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "framework": {**cfg["framework"], "version": "9.0", "format_version": 2}}))
    with pytest.raises(ValueError, match="written by foundation 9.0 .* upgrade foundation"):
        PairModel.from_pretrained(out)
    # strict: an extra / missing / mis-shaped weight is an error even when the checksum is right
    for edit, message in ((lambda s: {**s, "extra": torch.zeros(1)}, "unexpected \\['extra'\\]"),
                          (lambda s: {k: v for k, v in s.items() if k != "wq"}, "missing \\['wq'\\]"),
                          (lambda s: {**s, "wq": torch.zeros(1, 1)}, "shape mismatches")):
        save_file(edit(load_file_from(good, tmp_path)), str(weights))
        config.write_text(json.dumps({**cfg, "files": {WEIGHTS_NAME: sha256_file(weights)}}))
        with pytest.raises(ValueError, match=message):
            PairModel.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a Hub repo id"):
        PairModel.from_pretrained(tmp_path / "no" / "such" / "dir")
    with pytest.raises(FileNotFoundError, match="is a file"):
        PairModel.from_pretrained(weights)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_config(tmp_path)


def load_file_from(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "orig.safetensors"
    path.write_bytes(data)
    return load_file(str(path))


# --- through a Hub-protocol server --------------------------------------------------------------------------
_PRELUDE = """
import json, sys
sys.path.insert(0, {tests!r})
from test_calculator import PairModel, cu_au_bulk, pair_model
from foundation.calculator import FoundationCalculator

def predict(model):
    atoms = cu_au_bulk()
    atoms.calc = FoundationCalculator(model)
    return [atoms.get_potential_energy(), atoms.get_forces().tolist()]

def error(fn):
    try:
        fn()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None
"""

_ONLINE = """
from pathlib import Path
from foundation.cli import main
m1, m2 = pair_model(seed=1), pair_model(seed=2)
sha1 = m1.push_to_hub("org/pot", commit_message="v1", metrics={metrics!r}, datasets={datasets!r})
sha2 = m2.push_to_hub("org/pot", commit_message="v2")
m1.save_pretrained({work!r} + "/saved-v1")
rc = main(["push", {work!r} + "/saved-v1", "org/pot", "--revision", "dev"])
res = dict(sha1=sha1, sha2=sha2, rc=rc, e1=predict(m1), e2=predict(m2),
           main=predict(PairModel.from_pretrained("org/pot")),
           v1=predict(PairModel.from_pretrained("org/pot", revision=sha1)),
           dev=predict(PairModel.from_pretrained("org/pot", revision="dev")),
           no_repo=error(lambda: PairModel.from_pretrained("org/absent")),
           no_rev=error(lambda: PairModel.from_pretrained("org/pot", revision="v9")))
from huggingface_hub import hf_hub_download
res["card"] = Path(hf_hub_download("org/pot", "README.md", revision=sha1)).read_text()
# tamper with the weights stored on the server (same size, one bit) and download into a fresh cache
root = Path({root!r}) / "org" / "pot"
oid = json.loads((root / "commits" / (sha2 + ".json")).read_text())["tree"]["model.safetensors"]["oid"]
blob = root / "blobs" / oid
data = bytearray(blob.read_bytes()); data[-1] ^= 1; blob.write_bytes(bytes(data))
res["tampered"] = error(lambda: PairModel.from_pretrained("org/pot", cache_dir={work!r} + "/fresh-cache"))
print("RESULT" + json.dumps(res))
"""

_OFFLINE = """
res = dict(main=predict(PairModel.from_pretrained("org/pot")),
           v1=predict(PairModel.from_pretrained("org/pot", revision={sha1!r})),
           dev=predict(PairModel.from_pretrained("org/pot", revision="dev")),
           missing=error(lambda: PairModel.from_pretrained("org/never-downloaded")))
print("RESULT" + json.dumps(res))
"""


def _run(script: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow
def test_push_pull_revisions_offline_cache_and_tampering(tmp_path):
    root, work = tmp_path / "hub", tmp_path / "work"
    work.mkdir()
    server, url = serve_in_thread(root)
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "test-token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "OMP_NUM_THREADS": "1"}
    try:
        fmt = dict(tests=str(TESTS), metrics=METRICS, datasets=DATASETS, work=str(work), root=str(root))
        res = _run(_PRELUDE.format(**fmt) + _ONLINE.format(**fmt), env)
    finally:
        server.shutdown()
        server.server_close()
    assert res["rc"] == 0 and res["sha1"] != res["sha2"]
    assert res["e1"][0] != res["e2"][0]
    assert res["main"] == res["e2"]  # pull = identical predictions (exact floats)
    assert res["v1"] == res["e1"] and res["dev"] == res["e1"]  # an older revision loads the older weights
    assert res["no_repo"][0] == "FileNotFoundError" and "org/absent" in res["no_repo"][1]
    assert res["no_rev"][0] == "ValueError" and "'v9'" in res["no_rev"][1]
    assert res["tampered"][0] == "ValueError" and "corrupted or was modified" in res["tampered"][1]
    assert _front_matter(res["card"])["model-index"][0]["results"][0]["metrics"][0]["value"] == 1.234
    assert 'FoundationCalculator.from_pretrained("org/pot"' in res["card"]
    # the server is gone: everything that was downloaded loads from the cache
    offline = _run(_PRELUDE.format(tests=str(TESTS)) + _OFFLINE.format(sha1=res["sha1"]),
                   {**env, "HF_HUB_OFFLINE": "1"})
    assert offline["main"] == res["e2"] and offline["v1"] == res["e1"] and offline["dev"] == res["e1"]
    assert offline["missing"][0] == "FileNotFoundError" and "HF_HUB_OFFLINE=1" in offline["missing"][1]


def test_foundation_model_round_trip(tmp_path):
    from test_calculator import foundation_model

    from foundation import FoundationModel
    model = foundation_model(seed=5)
    out = model.save_pretrained(tmp_path / "fm", metrics=METRICS, datasets=DATASETS)
    loaded = FoundationModel.from_pretrained(out)
    assert loaded.config == model.config and not loaded.training
    e0, f0 = _predict(model)
    e1, f1 = _predict(loaded)
    assert e0 == e1 and np.array_equal(f0, f1)
    card = (out / "README.md").read_text()
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert "| max_L | 0 |" in card and "`pbe`, `r2scan`" in card
    cfg = json.loads((out / "config.json").read_text())  # a config field this version does not know
    (out / "config.json").write_text(json.dumps({**cfg, "model_config": {**cfg["model_config"], "new_field": 1}}))
    with pytest.raises(ValueError, match="not understood by this version .*upgrade foundation"):
        FoundationModel.from_pretrained(out)


_PUSH_FOUNDATION = """
import sys
sys.path.insert(0, {tests!r})
from test_calculator import foundation_model
from huggingface_hub import hf_hub_download
foundation_model(seed=7).push_to_hub("org/cu-au", metrics={metrics!r}, datasets={datasets!r})
print("CARD" + open(hf_hub_download("org/cu-au", "README.md")).read())
"""


@pytest.mark.slow
def test_card_example_runs_exactly_as_written(tmp_path):
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "test-token",
           "OMP_NUM_THREADS": "1"}
    try:
        push = subprocess.run([sys.executable, "-c", _PUSH_FOUNDATION.format(tests=str(TESTS), metrics=METRICS,
                                                                               datasets=DATASETS)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr[-3000:]
        card = push.stdout.split("CARD", 1)[1]
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        assert 'FoundationCalculator.from_pretrained("org/cu-au"' in code
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("potential energy (eV):") and lines[-1].startswith("total energy after 20 fs (eV):")
    assert np.isfinite(float(lines[-1].split(":")[1]))


@pytest.mark.slow
def test_wheel_ships_the_card_template(tmp_path):
    """A non-editable install must still render cards: the template is package data, not a repo-only file."""
    import zipfile
    root = TESTS.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, env=dict(os.environ, PIP_NO_INPUT="1"))
    wheel, = tmp_path.glob("foundation_mlip-*.whl")   # distribution foundation-mlip
    names = zipfile.ZipFile(wheel).namelist()
    assert "foundation/model_card_template.md" in names
    template = zipfile.ZipFile(wheel).read("foundation/model_card_template.md").decode()
    assert template == (root / "model_cards" / "TEMPLATE.md").read_text()


def test_checksummed_names_outside_the_model_folder_are_refused_unread(tmp_path, monkeypatch):
    """Regression (issue 18.14): config.json listing '/etc/hostname' or '../x' made the loader hash that file, and
    its error said whether the file existed. Now the name is refused before anything is opened, identically."""
    import foundation.hub as hub
    out = pair_model().save_pretrained(tmp_path / "m")
    config = out / "config.json"
    cfg = json.loads(config.read_text())
    (tmp_path / "exists").write_text("secret")
    opened = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda p: opened.append(str(p)) or real(p))
    messages = {}
    for name in ("/etc/hostname", "../exists", "../missing", "sub/../../exists", "..\\exists", "./"):
        config.write_text(json.dumps({**cfg, "files": {**cfg["files"], name: "0" * 64}}))
        with pytest.raises(ValueError, match="not a plain relative path inside the model folder") as exc:
            PairModel.from_pretrained(out)
        messages[name] = str(exc.value).replace(name[:80], "NAME")
        assert "secret" not in str(exc.value)
    assert opened == []  # nothing hashed, not even the model's own weights
    assert messages["../exists"] == messages["../missing"] == messages["/etc/hostname"]
    config.write_text(json.dumps(cfg))
    assert isinstance(PairModel.from_pretrained(out), PairModel)
