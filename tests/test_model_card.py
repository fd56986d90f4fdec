"""Model cards: the load example runs a head on elements that head was trained on, and a pushed card names the
Hub repo it was pushed to (not the local directory the model was saved in)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.card import example_head, usage_code
from foundation.hubserver import serve_in_thread

TESTS = Path(__file__).resolve().parent


def cfg(heads, elements, datasets):
    return {"model_config": {"heads": heads, "elements": elements}, "datasets": datasets}


def test_example_uses_the_first_head_with_recorded_training_elements():
    c = cfg(["cuau", "emt"], ["Al", "Cu", "Au"], [
        {"name": "heldout", "head": "cuau", "elements": ["Cu", "Au"]},
        {"name": "metals", "head": "emt", "elements": ["Al", "Cu"]}])
    assert example_head(c) == ("cuau", ["Cu", "Au"])
    code = usage_code(c, "org/cuau")
    assert 'from_pretrained("org/cuau", head="cuau"' in code and 'bulk("Cu"' in code and '"Al"' not in code


def test_example_without_recorded_elements_or_with_one_head():
    assert example_head(cfg(["a", "b"], ["Cu", "Au"], [])) == (None, ["Cu", "Au"])
    single = cfg(["default"], ["H", "C", "O"], [{"name": "x", "head": "default", "elements": ["H", "O"]}])
    assert example_head(single) == (None, ["H", "O"])
    code = usage_code(single, "m")
    assert "head=" not in code and 'molecule("' in code


_PUSH = """
import sys
sys.path.insert(0, {tests!r})
from test_calculator import pair_model
from huggingface_hub import hf_hub_download
from foundation.cli import main
pair_model(seed=3).save_pretrained({local!r})
assert main(["push", {local!r}, "org/pushed"]) == 0
print("CARD" + open(hf_hub_download("org/pushed", "README.md")).read())
"""


@pytest.mark.slow
def test_foundation_push_renders_the_card_for_the_repo(tmp_path):
    server, url = serve_in_thread(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "test-token",
           "OMP_NUM_THREADS": "1"}
    local = tmp_path / "local-model"
    try:
        proc = subprocess.run([sys.executable, "-c", _PUSH.format(tests=str(TESTS), local=str(local))], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = proc.stdout.split("CARD", 1)[1]
    assert 'from_pretrained("org/pushed"' in card and str(local) not in card
    assert str(local) in (local / "README.md").read_text()   # the local copy is left as it was saved
